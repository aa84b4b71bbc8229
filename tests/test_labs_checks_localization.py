"""Lab 04's checks pass on the reference, fail on known-wrong mutants with their hint, read a stub as "not
implemented" (tested for every lab in test_labs_checks.py); here: bad arguments, hand-worked cases, and the
closed-form references agree with the library (``fta.probes.top_delta_mask``, ``apply_mask``, ``GraftResult``)."""

from __future__ import annotations

import math

import pytest
import torch

from ftanalysis.labs.checks import LabCheckFailed
from ftanalysis.labs.checks import localization as checks
from ftanalysis.probes import localization as library


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_top_k_mask({"w": torch.ones(2)})
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_graft(dict)
    with pytest.raises(TypeError, match="lacks \\['sparsity'\\]"):
        checks.check_top_k_mask(lambda deltas: deltas)
    with pytest.raises(TypeError, match="lacks \\['mask'\\]"):
        checks.check_graft(lambda base, ft: ft)
    with pytest.raises(TypeError, match="lacks \\['acc_ft'\\]"):
        checks.check_recovery(lambda acc_graft, acc_base: 0.0)
    with pytest.raises(TypeError, match="lacks \\['bias'\\]"):
        checks.check_relaxed_mask(lambda S, base_mask: S)


def test_wrong_return_types_fail_clearly():
    with pytest.raises(LabCheckFailed, match="must return a dict"):
        checks.check_top_k_mask(lambda deltas, sparsity: torch.cat([d.reshape(-1) for d in deltas.values()]) > 0)
    with pytest.raises(LabCheckFailed, match="same names"):
        checks.check_graft(lambda base, ft, mask: {"w": next(iter(base.values()))})
    with pytest.raises(LabCheckFailed, match="one number"):
        checks.check_recovery(lambda acc_graft, acc_base, acc_ft: "0.5")


# ---------------------------------------------------------------------- hand-worked cases
def test_hand_worked_top_k_is_global_and_uses_magnitudes():
    # N = 8 entries, sparsity 0.375 -> k = 3. The three largest |delta| are -9 (a), 7 (b) and -5 (b): the global
    # mask takes two from b, and ranks the large negative changes by their size.
    deltas = {"a": torch.tensor([[1.0, -9.0], [0.5, 2.0]]), "b": torch.tensor([7.0, -5.0, 3.0, -0.25])}
    mask = checks.reference_top_k_mask(deltas, 0.375)
    assert torch.equal(mask["a"], torch.tensor([[False, True], [False, False]]))
    assert torch.equal(mask["b"], torch.tensor([True, True, False, False]))
    # a per-tensor top-k (round(0.375 * 4) = 2 each: -9, 2 and 7, -5) keeps four entries: not the same mask
    assert sum(int(m.sum()) for m in mask.values()) == 3
    # k = max(1, round(s * N)): 0.01 * 8 = 0.08 rounds to 0, the mask keeps the single largest |delta|
    tiny = checks.reference_top_k_mask(deltas, 0.01)
    assert int(tiny["a"].sum()) == 1 and bool(tiny["a"][0, 1]) and not tiny["b"].any()
    assert checks.n_kept(0.19, 40) == 8 and checks.n_kept(1.0, 40) == 40


def test_hand_worked_graft_recovery_and_relaxed_mask():
    base, ft = {"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([4.0, 5.0, 6.0])}
    grafted = checks.reference_graft(base, ft, {"w": torch.tensor([True, False, True])})
    assert torch.equal(grafted["w"], torch.tensor([4.0, 2.0, 6.0]))
    assert checks.reference_recovery(0.75, 0.5, 1.0) == 0.5
    assert checks.reference_recovery(0.5, 0.5, 1.0) == 0.0 and checks.reference_recovery(1.0, 0.5, 1.0) == 1.0
    assert math.isnan(checks.reference_recovery(0.7, 0.6, 0.6))
    # gamma = base + (1 - 2 base) sigmoid(S - b): one half at S = b; at the paper's init (S in [0, 1), b = 10)
    # within sigmoid(1 - 10) < 1.3e-4 of the binary mask, and within 5e-5 at S = 0
    mask = torch.tensor([True, False, True, False])
    torch.testing.assert_close(checks.reference_relaxed_mask(torch.full((4,), 10.0), mask, 10.0), torch.full((4,), 0.5))
    at_zero = checks.reference_relaxed_mask(torch.zeros(4), mask, 10.0)
    assert (at_zero - mask.float()).abs().max() < 5e-5
    S = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert (checks.reference_relaxed_mask(S, torch.rand(1000) < 0.5, 10.0) - 0.5).abs().min() > 0.5 - 1.3e-4


def test_top_k_cases_separate_the_mistakes():
    """In every case the global mask differs from the per-tensor one, so that mistake cannot pass by luck."""
    differs = 0
    for case in checks._top_k_cases():
        deltas = checks._deltas(case)
        expected = checks.reference_top_k_mask(deltas, case["sparsity"])
        per_tensor = {n: checks.reference_top_k_mask({n: d}, case["sparsity"])[n] for n, d in deltas.items()}
        differs += not checks._same_masks(per_tensor, expected)
        flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
        assert flat.unique().numel() == flat.numel()  # no ties: the top-k mask is unique
    assert differs == len(list(checks._top_k_cases()))


# ---------------------------------------------------------------------- the references agree with the library
def _tiny_gpt2_pair():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(config).eval()
    ft = GPT2LMHeadModel(config).eval()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # changes of different sizes per parameter: a global ranking is not a per-tensor one
        for i, p in enumerate(ft.parameters()):
            p.add_(0.01 * (1 + i % 5) * torch.randn(p.shape, generator=g))
    return base, ft


def test_reference_top_k_matches_the_library():
    base, ft = _tiny_gpt2_pair()
    base_params, ft_params = dict(base.named_parameters()), dict(ft.named_parameters())
    for sparsity in (0.001, 0.05, 0.3):
        expected = library.top_delta_mask(base, ft, sparsity)
        deltas = {n: (ft_params[n] - base_params[n]).detach() for n in expected}
        assert checks._same_masks(checks.reference_top_k_mask(deltas, sparsity), expected)


def test_reference_graft_matches_apply_mask():
    base, ft = _tiny_gpt2_pair()
    mask = library.random_mask(base, ft, 0.2, seed=3)
    grafted = dict(library.apply_mask(base, ft, mask).named_parameters())
    base_params, ft_params = dict(base.named_parameters()), dict(ft.named_parameters())
    mine = checks.reference_graft({n: base_params[n].detach() for n in mask}, {n: ft_params[n].detach() for n in mask}, mask)
    for name in mask:
        assert torch.equal(mine[name], grafted[name].detach()), name


def test_reference_recovery_matches_graft_result():
    scores = {"reference": {"accuracy": 0.1, "loss": 2.0}, "fine-tuned": {"accuracy": 0.9, "loss": 0.5},
              "grafted": {"accuracy": 0.7, "loss": 1.0}}
    result = library.GraftResult(kind="given", mask={}, model=None, target_sparsity=0.1, sparsity=0.1, n_selected=1,
                                 n_maskable=10, scores=scores, from_ft=[], kept_base=[])
    assert math.isclose(result.recovery, checks.reference_recovery(0.7, 0.1, 0.9))
