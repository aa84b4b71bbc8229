"""Checks for lab 04, skill localization by grafting (Panigrahi, Saunshi, Zhao and Arora, "Task-Specific Skill
Localization in Fine-tuned Language Models", ICML 2023, arXiv 2302.06600).

With the task vector ``tau = theta_ft - theta_pre`` and a binary mask ``gamma``, the grafted model is
``theta_pre + gamma * tau``. Masks and parameters are dicts of tensors (parameter name -> tensor), as in
:mod:`ftanalysis.probes.localization`. Every expected value is a closed form computed here on seeded tensors
(the top-k mask with one global ranking, exactly as :func:`ftanalysis.probes.top_delta_mask` ranks them);
the cases have no ties in ``|tau|``, so the top-k mask is unique and checked exactly.
"""

from __future__ import annotations

import math

import torch

from ._core import resolve, running, seeded


# ---------------------------------------------------------------------- references (closed forms)
def n_kept(sparsity: float, n: int) -> int:
    """Mask size for a sparsity (the fraction of entries *kept*): ``max(1, round(sparsity * N))``, at most ``N``."""
    return max(1, min(n, round(sparsity * n)))


def _top_k_by(scores: dict[str, torch.Tensor], k: int, largest: bool = True) -> dict[str, torch.Tensor]:
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, largest=largest).indices] = True
    pieces = torch.split(keep, [scores[n].numel() for n in names])
    return {n: piece.reshape(scores[n].shape) for n, piece in zip(names, pieces)}


def reference_top_k_mask(deltas: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The ``k = max(1, round(sparsity * N))`` entries with the largest ``|delta|`` over *all* tensors together."""
    n = sum(d.numel() for d in deltas.values())
    return _top_k_by({name: d.abs() for name, d in deltas.items()}, n_kept(sparsity, n))


def reference_graft(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + mask * (ft - base)`` per tensor (as the library computes it: masked entries ``base + tau``)."""
    return {name: torch.where(mask[name].bool(), base[name] + (ft[name] - base[name]), base[name]) for name in mask}


def reference_recovery(acc_graft: float, acc_base: float, acc_ft: float) -> float:
    """``(acc_graft - acc_base) / (acc_ft - acc_base)``; NaN when fine-tuning gained nothing."""
    return (acc_graft - acc_base) / (acc_ft - acc_base) if acc_ft != acc_base else float("nan")


def reference_relaxed_mask(S: torch.Tensor, base_mask: torch.Tensor, bias: float) -> torch.Tensor:
    """``gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - bias)``."""
    gamma_base = base_mask.to(S.dtype)
    return gamma_base + (1 - 2 * gamma_base) * torch.sigmoid(S - bias)


# ---------------------------------------------------------------------- seeded cases
# (tensor shapes, their scales, sparsity): tensors of different scales make a per-tensor top-k differ from the
# global one; 0.19 * 40 = 7.6 makes round() differ from int(); 0.005 * 50 = 0.25 rounds to 0, so the mask keeps 1.
_TOP_K_CASES = [
    ({"attn.weight": (8, 6), "attn.bias": (6,)}, (1.0, 3.0), 0.1),
    ({"mlp.up": (6, 5), "mlp.down": (5, 6), "ln.weight": (5,)}, (0.1, 1.0, 10.0), 0.25),
    ({"q": (4, 5), "k": (4, 5)}, (1.0, 2.0), 0.19),
    ({"w": (10, 4), "b": (10,)}, (1.0, 1.0), 0.005),
    ({"w1": (7, 7), "w2": (7, 3)}, (2.0, 0.5), 0.6),
]


def _top_k_cases():
    for seed, (shapes, scales, sparsity) in enumerate(_TOP_K_CASES):
        yield {"seed": seed, "tensors": {n: tuple(s) for n, s in shapes.items()}, "scales": scales, "sparsity": sparsity}


def _deltas(case) -> dict[str, torch.Tensor]:
    g = seeded(case["seed"])
    return {name: scale * torch.randn(*shape, generator=g) for (name, shape), scale in zip(case["tensors"].items(), case["scales"])}


def _graft_cases():
    for seed, (shapes, p) in enumerate([({"attn.weight": (6, 4), "attn.bias": (4,)}, 0.3),
                                        ({"mlp.up": (5, 3), "mlp.down": (3, 5), "ln.weight": (5,)}, 0.5),
                                        ({"w": (8, 8)}, 0.1), ({"w": (3, 7), "b": (7,)}, 0.8)]):
        yield {"seed": seed, "tensors": shapes, "p(mask)": p}


def _graft_inputs(case):
    g = seeded(100 + case["seed"])
    base = {n: torch.randn(*s, generator=g) for n, s in case["tensors"].items()}
    ft = {n: base[n] + 0.5 * torch.randn(*s, generator=g) for n, s in case["tensors"].items()}
    mask = {n: torch.rand(*s, generator=g) < case["p(mask)"] for n, s in case["tensors"].items()}
    return base, ft, mask


def _same_masks(a, b) -> bool:
    return (isinstance(a, dict) and set(a) == set(b)
            and all(isinstance(a[n], torch.Tensor) and a[n].shape == b[n].shape and torch.equal(a[n].bool().cpu(), b[n].bool().cpu()) for n in b))


def _close_dicts(a, b, atol=1e-6) -> bool:
    return (isinstance(a, dict) and set(a) == set(b)
            and all(isinstance(a[n], torch.Tensor) and a[n].shape == b[n].shape and torch.allclose(a[n].float().cpu(), b[n].float().cpu(), atol=atol, rtol=1e-6) for n in b))


def _require_dict_of_tensors(check, case, got, like, what):
    check.require(isinstance(got, dict), case, f"{what} must return a dict of parameter name -> tensor. Got {type(got).__name__}.")
    check.require(set(got) == set(like), case, f"{what} must return one tensor per input tensor, with the same names: "
                  f"expected {sorted(like)}, got {sorted(got)}.")
    for name in like:
        check.require(isinstance(got[name], torch.Tensor), case, f"{what}: entry {name!r} must be a tensor. Got {type(got[name]).__name__}.")
        check.require(tuple(got[name].shape) == tuple(like[name].shape), case,
                      f"{what}: entry {name!r} has shape {tuple(got[name].shape)}; the parameter has shape {tuple(like[name].shape)}.")


# ---------------------------------------------------------------------- checks
def check_top_k_mask(top_k_mask=None) -> None:
    """``top_k_mask(deltas, sparsity)``: the binary top-k mask of the paper's initialisation.

    ``deltas`` maps parameter names to ``tau = theta_ft - theta_pre``; ``sparsity`` is the fraction of entries
    *kept*. Keep the ``k = max(1, round(sparsity * N))`` entries with the largest ``|tau|``, ranked over all
    ``N`` entries of all tensors together (one global ranking, as Panigrahi et al. 2023 and
    ``fta.probes.top_delta_mask``). Return a dict name -> bool tensor of the parameter's shape.
    """
    fn = resolve(top_k_mask, reference_top_k_mask, "check_top_k_mask", "function", ["deltas", "sparsity"])
    with running("check_top_k_mask") as check:
        for case in check.cases(_top_k_cases()):
            deltas = _deltas(case)
            s = case["sparsity"]
            n = sum(d.numel() for d in deltas.values())
            k = n_kept(s, n)
            expected = reference_top_k_mask(deltas, s)
            got = fn({name: d.clone() for name, d in deltas.items()}, s)
            _require_dict_of_tensors(check, case, got, deltas, "top_k_mask")
            for name in deltas:
                check.require(got[name].dtype == torch.bool, case, f"mask[{name!r}] has dtype {got[name].dtype}; a mask holds bool values.",
                              "return bool tensors: a comparison such as delta.abs() >= threshold, or a bool tensor filled "
                              "at the top-k indices, gives one.")
            absolute = {name: d.abs() for name, d in deltas.items()}
            wrong = [
                (_top_k_by(deltas, k), "rank by |delta| (delta.abs()): a large negative change matters as much as a large positive one."),
                (_top_k_by(absolute, k, largest=False), "keep the k *largest* |delta|, not the smallest (topk's default is largest=True)."),
                ({name: _top_k_by({name: a}, n_kept(s, a.numel()))[name] for name, a in absolute.items()},
                 "rank all tensors together (one global top-k over the concatenated |delta|), not each tensor on its own: "
                 "tensors whose changes are larger should get more of the mask."),
                (_top_k_by(absolute, n_kept(1 - s, n)),
                 "sparsity is the fraction of entries *kept* in the mask (k = round(sparsity * N)), not the fraction removed."),
            ]
            hint = next((text for alternative, text in wrong if _same_masks(got, alternative)), None)
            size = int(sum(int(got[name].sum()) for name in deltas))
            check.require(size == k, case, f"mask size: expected k = max(1, round({s} * {n})) = {k} entries in all, got {size}",
                          hint or f"keep exactly k = max(1, round(sparsity * N)) entries, N = {n} being the entries of *all* tensors "
                          "(Python's round(), not int(), and at least one entry).")
            for name in deltas:
                check.compare(f"mask[{name!r}]", expected[name], got[name], case, hints=[lambda e, o, c: hint])


def check_graft(graft=None) -> None:
    """``graft(base, ft, mask)``: the grafted parameters ``base + mask * (ft - base)``, per tensor.

    Entries in the mask take their fine-tuned value, the others keep their pretrained value (Panigrahi et al.
    2023, ``theta_pre + gamma * tau``). ``base``, ``ft`` and ``mask`` are dicts with the same names; return a
    new dict and leave the inputs unchanged.
    """
    fn = resolve(graft, reference_graft, "check_graft", "function", ["base", "ft", "mask"])
    with running("check_graft") as check:
        for case in check.cases(_graft_cases()):
            base, ft, mask = _graft_inputs(case)
            expected = reference_graft(base, ft, mask)
            args = ({n: t.clone() for n, t in base.items()}, {n: t.clone() for n, t in ft.items()}, {n: t.clone() for n, t in mask.items()})
            got = fn(*args)
            check.require(all(torch.equal(a, b) for given, original in zip(args, (base, ft, mask)) for a, b in zip(given.values(), original.values())),
                          case, "graft changed one of its inputs in place",
                          "build new tensors (torch.where, or base + mask * (ft - base)); an in-place add_ or copy_ into base "
                          "would change the pretrained model itself.")
            _require_dict_of_tensors(check, case, got, base, "graft")
            tau = {n: ft[n] - base[n] for n in base}
            m = {n: mask[n].float() for n in base}
            wrong = [
                ({n: m[n] * ft[n] for n in base}, "unselected entries must keep their pretrained value: add the base "
                 "(base + mask * (ft - base)), not mask * ft alone."),
                ({n: m[n] * tau[n] for n in base}, "mask * (ft - base) is the masked task vector: add it to the base."),
                ({n: base[n] + (1 - m[n]) * tau[n] for n in base}, "the mask is inverted: True means *take* the fine-tuned value."),
                ({n: ft[n] + m[n] * tau[n] for n in base}, "start from the base (theta_pre), not from the fine-tuned model."),
            ]
            hint = next((text for alternative, text in wrong if _close_dicts(got, alternative)), None)
            for name in base:
                check.compare(f"grafted[{name!r}]", expected[name], got[name], case, atol=1e-6, rtol=1e-6, hints=[lambda e, o, c: hint])


def check_recovery(recovery=None) -> None:
    """``recovery(acc_graft, acc_base, acc_ft)``: the recovered fraction of the fine-tuning gain,
    ``(acc_graft - acc_base) / (acc_ft - acc_base)``: 0 for the pretrained model, 1 for the fine-tuned one
    (Panigrahi et al. 2023 report the grafted accuracy against both). ``float('nan')`` when ``acc_ft == acc_base``."""
    fn = resolve(recovery, reference_recovery, "check_recovery", "function", ["acc_graft", "acc_base", "acc_ft"])
    values = [(0.9, 0.5, 0.95), (0.5, 0.0, 0.95), (0.3, 0.5, 0.95), (0.97, 0.49, 0.96), (0.8, 0.1, 0.6), (0.7, 0.6, 0.6)]
    cases = [{"acc_graft": g, "acc_base": b, "acc_ft": f} for g, b, f in values]
    with running("check_recovery") as check:
        for case in check.cases(cases):
            g, b, f = case["acc_graft"], case["acc_base"], case["acc_ft"]
            expected = reference_recovery(g, b, f)
            try:
                got = fn(g, b, f)
            except ZeroDivisionError:
                check.fail(case, "ZeroDivisionError", "with no gain (acc_ft == acc_base) there is nothing to recover: return float('nan').")
            check.require(isinstance(got, (int, float)) or (isinstance(got, torch.Tensor) and got.numel() == 1), case,
                          f"recovery must return one number. Got {got!r}.")
            got = float(got)
            if math.isnan(expected):
                check.require(math.isnan(got), case, f"recovery with no gain: expected nan, got {got:.6g}",
                              "with no gain (acc_ft == acc_base) there is nothing to recover: return float('nan'), not a number.")
                continue
            hints = [
                (g / f, "divide the graft's gain over the base (acc_graft - acc_base) by the fine-tuning gain; acc_graft / acc_ft ignores the base."),
                ((g - b) / f, "divide by the fine-tuning *gain* (acc_ft - acc_base), not by acc_ft."),
                ((g - b) / (f - g) if f != g else math.inf, "the denominator is the whole gain acc_ft - acc_base, not what is left to recover."),
                ((f - g) / (f - b), "that is the fraction *lost*: recovery is (acc_graft - acc_base) / (acc_ft - acc_base)."),
            ]
            hint = next((text for value, text in hints if math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12)), None)
            check.require(math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12), case,
                          f"recovery: expected {expected:.6g}, got {got:.6g}", hint)


# (shape, bias, law of S, its two parameters): S spread around the bias makes sigmoid(S - bias) of order 1 (a
# wrong formula shows); the last case is the paper's initialisation S ~ U[0, 1) with bias 10.
_RELAXED_CASES = [((6, 5), 10.0, "N", 10.0, 3.0), ((40,), 3.0, "N", 3.0, 2.0), ((4, 4, 3), 0.0, "N", 0.0, 2.0), ((8, 8), 10.0, "U", 0.0, 1.0)]


def check_relaxed_mask(relaxed_mask=None) -> None:
    """``relaxed_mask(S, base_mask, bias)``: the paper's real-valued mask,
    ``gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - bias)``, differentiable in ``S``.

    Inside the initial (top-k) mask ``gamma = 1 - sigmoid(S - bias)``, outside it ``gamma = sigmoid(S - bias)``;
    with ``S ~ U[0, 1)`` and ``bias = 10`` it starts within 5e-5 of the binary mask (Panigrahi et al. 2023,
    ``src/graft_trainer.py``; ``fta.probes.graft``). ``S`` is a float tensor, ``base_mask`` a bool tensor of its shape.
    """
    fn = resolve(relaxed_mask, reference_relaxed_mask, "check_relaxed_mask", "function", ["S", "base_mask", "bias"])
    cases = [{"seed": seed, "shape": shape, "bias": bias, "S": f"{law}({a:g}, {b:g})"} for seed, (shape, bias, law, a, b) in enumerate(_RELAXED_CASES)]
    with running("check_relaxed_mask") as check:
        for case in check.cases(cases):
            _, _, law, a, b = _RELAXED_CASES[case["seed"]]
            g = seeded(200 + case["seed"])
            S = a + b * torch.randn(*case["shape"], generator=g) if law == "N" else a + (b - a) * torch.rand(*case["shape"], generator=g)
            base_mask = torch.rand(*case["shape"], generator=g) < 0.4
            bias = case["bias"]
            expected = reference_relaxed_mask(S, base_mask, bias)
            S_student = S.clone().requires_grad_(True)
            got = fn(S_student, base_mask.clone(), bias)
            check.require(isinstance(got, torch.Tensor), case, f"relaxed_mask must return a tensor. Got {type(got).__name__}.")
            check.require(got.is_floating_point(), case, f"relaxed_mask must return a float tensor (gamma in (0, 1)). Got dtype {got.dtype}.",
                          "return the relaxed (real-valued) gamma, not its rounding: the mask is learned by gradient steps on S.")
            gb = base_mask.float()
            sig = torch.sigmoid(S - bias)
            wrong = [
                (gb + sig, "inside the initial mask gamma must start near 1 and *decrease*: gamma_base + (1 - 2 gamma_base) * sigmoid(S - bias) "
                 "gives 1 - sigmoid(S - bias) there."),
                (gb + (1 - 2 * gb) * torch.sigmoid(S + bias), "shift by minus the bias: sigmoid(S - bias), which is about 5e-5 for S near 0 and bias 10."),
                (gb + (1 - 2 * gb) * torch.sigmoid(S), "subtract the bias inside the sigmoid: sigmoid(S - bias)."),
                ((gb + (1 - 2 * gb) * sig > 0.5).float(), "return the relaxed (real-valued) gamma, not its rounding: the mask is learned by gradient steps on S."),
            ]
            hint = next((text for alternative, text in wrong if alternative.shape == got.shape
                         and torch.allclose(got.detach().float(), alternative, atol=1e-6, rtol=1e-5)), None)
            check.compare("gamma", expected, got.detach(), case, atol=1e-6, rtol=1e-5, hints=[lambda e, o, c: hint])
            # the gradient must reach S: d gamma / d S = (1 - 2 gamma_base) sigmoid'(S - bias)
            check.require(got.requires_grad, case, "gamma does not depend on S through autograd (got.requires_grad is False)",
                          "keep gamma differentiable in S: no .detach(), .item(), torch.no_grad() or numpy on the way.")
            (grad,) = torch.autograd.grad(got.sum(), S_student, allow_unused=True)
            check.require(grad is not None, case, "gamma does not depend on S through autograd",
                          "keep gamma differentiable in S: no .detach(), .item(), torch.no_grad() or numpy on the way.")
            check.compare("d gamma / d S", (1 - 2 * gb) * sig * (1 - sig), grad, case, atol=1e-6, rtol=1e-4)
