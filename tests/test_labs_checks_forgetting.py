"""Lab 06's checks pass on the reference, fail on known-wrong mutants with their hint, read a stub as "not
implemented" (tested for every lab in test_labs_checks.py); here: bad arguments, and the references agree with
hand-worked cases and independent recomputations."""

from __future__ import annotations

import math

import pytest
import torch

from ftanalysis.labs.checks import LabCheckFailed
from ftanalysis.labs.checks import forgetting as checks


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_answer_loss(torch.zeros(3))
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_spearman(torch.nn.Linear)
    with pytest.raises(TypeError, match="lacks \\['mask'\\]"):
        checks.check_token_kl(lambda logits_base, logits_ft: 0.0)
    with pytest.raises(TypeError, match="lacks \\['answer_mask'\\]"):
        checks.check_answer_loss(lambda logits, input_ids: 0.0)


def test_a_non_scalar_result_fails_with_a_clear_message():
    with pytest.raises(LabCheckFailed, match="one number"):
        checks.check_token_kl(lambda logits_base, logits_ft, mask: torch.zeros(2))


# ---------------------------------------------------------------------- answer loss: hand-worked
def test_answer_loss_hand_worked():
    # One example of 3 tokens [0, 1, 1] over a 2-token vocabulary; only token 2 is an answer token. It is predicted
    # by the logits at position 1, [0, log 3]: p(token 1) = 3 / 4, so the loss is -log(3/4). The logits at
    # positions 0 and 2 must not matter (set to extreme values).
    logits = torch.tensor([[[50.0, -50.0], [0.0, math.log(3.0)], [-50.0, 50.0]]])
    input_ids = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[False, False, True]])
    assert float(checks.reference_answer_loss(logits, input_ids, mask)) == pytest.approx(-math.log(0.75), abs=1e-6)


def test_answer_loss_is_a_per_token_mean():
    # Example 0 has one answer token with loss log 2 (uniform over 2); example 1 has three with loss 0 (certain).
    # Per token: log 2 / 4; a mean of per-example means would give log 2 / 2.
    big = 60.0
    logits = torch.zeros(2, 5, 2)
    logits[1, :, 1] = big  # example 1 always predicts token 1 with certainty
    input_ids = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 1, 1, 0]])
    mask = torch.tensor([[False, False, False, True, False], [False, True, True, True, False]])
    assert float(checks.reference_answer_loss(logits, input_ids, mask)) == pytest.approx(math.log(2) / 4, abs=1e-6)


def test_answer_loss_matches_what_evaluate_reports():
    """On the zoo base and a real task, the reference (mask from collate's labels) is the loss ``evaluate`` reports."""
    import ftanalysis as fta
    from ftanalysis.tasks.base import collate

    model, tok = fta.zoo.load("gpt2-tiny")
    task = fta.tasks.make("copy")
    examples = task.examples(16)
    batch = collate(examples, tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = checks.reference_answer_loss(logits, batch["input_ids"], batch["labels"] != -100)
    assert float(loss) == pytest.approx(task.evaluate(model, tok, n=16)["loss"], rel=1e-5)


# ---------------------------------------------------------------------- token KL: hand-worked
def test_token_kl_hand_worked_two_tokens():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 log(2) + 1/2 log(2/3); the reverse direction differs.
    logits_base = torch.tensor([[[0.0, 0.0]]])
    logits_ft = torch.tensor([[[0.0, math.log(3.0)]]])
    mask = torch.tensor([[True]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(checks.reference_token_kl(logits_base, logits_ft, mask)) == pytest.approx(expected, abs=1e-6)
    assert float(checks.reference_token_kl(logits_ft, logits_base, mask)) == pytest.approx(reverse, abs=1e-6)
    assert abs(expected - reverse) > 1e-3


def test_token_kl_zero_for_identical_or_shifted_logits_and_averages_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert float(checks.reference_token_kl(logits, logits.clone(), mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(checks.reference_token_kl(logits, logits + 3.0, mask)) == pytest.approx(0.0, abs=1e-6)
    # two positions: KL a at one, 0 at the other, only the first selected -> a; both selected -> a / 2
    base = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    ft = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
    a = float(checks.reference_token_kl(base[:, :1], ft[:, :1], torch.tensor([[True]])))
    assert float(checks.reference_token_kl(base, ft, torch.tensor([[True, False]]))) == pytest.approx(a, abs=1e-7)
    assert float(checks.reference_token_kl(base, ft, torch.tensor([[True, True]]))) == pytest.approx(a / 2, abs=1e-7)


def test_token_kl_agrees_with_torch_kl_div():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 11, generator=g, dtype=torch.float64), torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.5
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q) = KL(p || q)
    per_position = torch.nn.functional.kl_div(torch.log_softmax(b, -1), torch.log_softmax(a, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(checks.reference_token_kl(a, b, mask), per_position[mask].mean())


# ---------------------------------------------------------------------- spearman: hand-worked
def test_average_ranks_hand_worked():
    assert checks.average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert checks.average_ranks(torch.tensor([1.0, 1.0, 1.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_worked():
    # monotone but not linear: rho = 1 (Pearson < 1); reversed: -1
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert checks.reference_spearman(x, x**3) == pytest.approx(1.0)
    assert checks.reference_spearman(x, -torch.exp(x)) == pytest.approx(-1.0)
    # ties: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3): centred (-0.75, -0.75, 1.5) and (-1, 0, 1);
    # rho = 2.25 / sqrt(3.375 * 2) = sqrt(3) / 2
    rho = checks.reference_spearman(torch.tensor([0.0, 0.0, 7.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert rho == pytest.approx(math.sqrt(3) / 2, abs=1e-9)


def test_spearman_reference_agrees_with_the_rank_definition():
    """The scipy-backed reference against Pearson of average ranks written here (the fallback path)."""
    for case in checks.SPEARMAN_CASES:
        x, y = checks.spearman_pair(case)
        assert checks.reference_spearman(x, y) == pytest.approx(checks._pearson(checks.average_ranks(x), checks.average_ranks(y)), abs=1e-9)


def test_spearman_cases_have_ties_and_a_nonlinear_monotone_case():
    pairs = [checks.spearman_pair(c) for c in checks.SPEARMAN_CASES]
    assert any(len(x.unique()) < len(x) for x, _ in pairs)
    assert any(checks.reference_spearman(x, y) == pytest.approx(1.0) and checks._pearson(x, y) < 0.9 for x, y in pairs)
