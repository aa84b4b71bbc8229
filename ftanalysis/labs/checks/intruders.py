"""Checks for lab 02, intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228).

Expected values come from :func:`ftanalysis.probes.intruder_dimensions` on planted matrices: a base ``W0``
plus rank-one updates ``sigma u v^T`` along chosen directions, some aligned with a singular vector of ``W0``
(not intruders) and some random (intruders when ``sigma`` puts them in the top k). The scaling exercise is
checked through a property that does not depend on how it is written: the result has the same singular
vectors as ``W1`` and the j-th singular value multiplied by ``lam``.
"""

from __future__ import annotations

import math

import torch

from ...probes.spectral import intruder_dimensions
from ._core import resolve, running, seeded


# ---------------------------------------------------------------------- planted matrices
def planted(out: int, inp: int, n_intruders: int, n_aligned: int, seed: int, sigma: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W0, W1)``: ``W0`` random ``(out, in)``, ``W1 = W0 + sum sigma_i u_i v_i^T`` with ``n_intruders`` random
    unit directions ``u_i`` and ``n_aligned`` directions equal to left singular vectors of ``W0``."""
    g = seeded(seed)
    W0 = torch.randn(out, inp, generator=g) / math.sqrt(inp)
    U0, _, _ = torch.linalg.svd(W0, full_matrices=False)
    W1 = W0.clone()
    for i in range(n_intruders):
        u = torch.randn(out, generator=g)
        v = torch.randn(inp, generator=g)
        W1 += (sigma + i) * torch.outer(u / u.norm(), v / v.norm())
    for i in range(n_aligned):
        u = U0[:, int(torch.randint(0, min(out, inp), (1,), generator=g))]
        v = torch.randn(inp, generator=g)
        W1 += (sigma + 0.5 + i) * torch.outer(u, v / v.norm())
    return W0, W1


def _cases():
    for seed, (out, inp, n_int, n_al, k) in enumerate([(64, 64, 2, 2, 10), (96, 48, 1, 3, 8), (40, 80, 3, 0, 6), (64, 64, 0, 3, 10)]):
        yield {"seed": seed, "shape": (out, inp), "planted intruders": n_int, "aligned": n_al, "k": k}


def _matrices(case):
    out, inp = case["shape"]
    return planted(out, inp, case["planted intruders"], case["aligned"], seed=case["seed"])


# ---------------------------------------------------------------------- references
def reference_max_cosine(W0: torch.Tensor, W1: torch.Tensor, k: int) -> torch.Tensor:
    return intruder_dimensions(W0, W1, k=k).max_cos.to(W1)


def reference_count_intruders(W0: torch.Tensor, W1: torch.Tensor, k: int, eps: float) -> int:
    return intruder_dimensions(W0, W1, k=k, eps=eps).count


def reference_scale_direction(W1: torch.Tensor, j: int, lam: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W1.double(), full_matrices=False)
    return (W1.double() + (lam - 1.0) * S[j] * torch.outer(U[:, j], Vh[j])).to(W1)


def _close(a, b, atol=1e-4):
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-3)


# ---------------------------------------------------------------------- checks
def check_max_cosine(max_cosine=None) -> None:
    """``max_cosine(W0, W1, k)``: for each of the top-``k`` left singular vectors of ``W1`` (by singular value),
    the largest |cosine| with *any* left singular vector of ``W0``; a ``[k]`` tensor."""
    fn = resolve(max_cosine, reference_max_cosine, "check_max_cosine", "function", ["W0", "W1", "k"])
    with running("check_max_cosine") as check:
        for case in check.cases(_cases()):
            W0, W1 = _matrices(case)
            k = case["k"]
            expected = reference_max_cosine(W0, W1, k)
            got = fn(W0.clone(), W1.clone(), k)
            check.require(isinstance(got, torch.Tensor), case, f"max_cosine must return a tensor. Got {type(got).__name__}.")
            U0, _, V0h = torch.linalg.svd(W0, full_matrices=False)
            U1, _, V1h = torch.linalg.svd(W1, full_matrices=False)
            signed = (U1[:, :k].T @ U0).max(dim=1).values
            top_only = (U1[:, :k].T @ U0[:, :k]).abs().max(dim=1).values
            right = (V1h[:k] @ V0h.T).abs().max(dim=1).values
            rows = (U1[:k] @ U0.T).abs().max(dim=1).values if U1.shape[0] >= k else None
            check.compare("max |cos| per top-k vector of W1", expected, got, case, atol=1e-4, rtol=1e-3, hints=[
                lambda e, o, c: "take |cos|: a singular vector is defined only up to its sign." if _close(o, signed) else None,
                lambda e, o, c: "compare with *every* singular vector of W0, not only its top k." if _close(o, top_only) else None,
                lambda e, o, c: "use the left singular vectors (columns of U: the output space), not the right ones."
                if _close(o, right) else None,
                lambda e, o, c: "singular vectors are the *columns* of U (U[:, j]), not its rows." if rows is not None and _close(o, rows) else None,
                lambda e, o, c: f"return one value per top-k vector: shape [{c['k']}]." if o.shape != e.shape else None,
            ])


def check_count_intruders(count_intruders=None) -> None:
    """``count_intruders(W0, W1, k, eps)``: how many of the top-``k`` left singular vectors of ``W1`` have
    max |cos| < ``eps`` against ``W0`` (an int)."""
    fn = resolve(count_intruders, reference_count_intruders, "check_count_intruders", "function", ["W0", "W1", "k", "eps"])
    cases = [dict(c, eps=eps) for c, eps in zip(_cases(), (0.5, 0.5, 0.6, 0.5))]
    cases.append({"seed": 9, "shape": (64, 64), "planted intruders": 0, "aligned": 0, "k": 10, "eps": 0.5, "W1": "W0"})
    with running("check_count_intruders") as check:
        for case in check.cases(cases):
            W0, W1 = _matrices(case)
            if case.get("W1") == "W0":
                W1 = W0.clone()
            result = intruder_dimensions(W0, W1, k=case["k"], eps=case["eps"])
            got = fn(W0.clone(), W1.clone(), case["k"], case["eps"])
            check.require(isinstance(got, (int, torch.Tensor)) and torch.as_tensor(got).numel() == 1, case,
                          f"count_intruders must return one integer. Got {got!r}.")
            got = int(got)
            n_all = int((intruder_dimensions(W0, W1, k=min(W0.shape), eps=case["eps"]).max_cos < case["eps"]).sum())
            hints = {
                case["k"] - result.count: "count the vectors *below* eps (max |cos| < eps): those with no counterpart in W0.",
                n_all: "look only at the top k singular vectors of W1, not at all of them.",
            }
            check.require(got == result.count, case,
                          f"intruder count: expected {result.count} (ranks {list(result.ranks)}, max |cos| "
                          f"{[round(float(x), 2) for x in result.max_cos]}), got {got}",
                          hints.get(got) if got != result.count else None)


def check_scale_direction(scale_direction=None) -> None:
    """``scale_direction(W1, j, lam)``: ``W1 + (lam - 1) * s_j u_j v_j^T`` (0-based ``j``): same singular vectors,
    the j-th singular value multiplied by ``lam`` (``lam = 0`` removes the direction)."""
    fn = resolve(scale_direction, reference_scale_direction, "check_scale_direction", "function", ["W1", "j", "lam"])
    cases = [{"seed": s, "shape": sh, "j": j, "lam": lam} for s, (sh, j, lam) in enumerate(
        [((48, 24), 2, 0.5), ((32, 32), 0, 0.0), ((20, 40), 1, 2.0), ((16, 16), 3, 0.25)])]
    with running("check_scale_direction") as check:
        for case in check.cases(cases):
            W1 = torch.randn(*case["shape"], generator=seeded(case["seed"]))
            expected = reference_scale_direction(W1, case["j"], case["lam"])
            got = fn(W1.clone(), case["j"], case["lam"])
            check.require(isinstance(got, torch.Tensor), case, f"scale_direction must return a tensor. Got {type(got).__name__}.")
            U, S, Vh = torch.linalg.svd(W1, full_matrices=False)
            j = case["j"]
            direction = S[j] * torch.outer(U[:, j], Vh[j])
            check.compare("scaled matrix", expected, got, case, atol=1e-4, rtol=1e-3, hints=[
                lambda e, o, c: "you returned lam * W1: scale only the j-th singular direction." if _close(o, c["lam"] * W1) else None,
                lambda e, o, c: "you returned the scaled direction alone: add it to W1 (W1 + (lam - 1) s_j u_j v_j^T)."
                if _close(o, c["lam"] * direction) or _close(o, (c["lam"] - 1) * direction) else None,
                lambda e, o, c: "W1 already contains s_j u_j v_j^T once: add (lam - 1) times it, not lam times." if _close(o, W1 + c["lam"] * direction) else None,
                lambda e, o, c: "index j is 0-based: j = 0 is the largest singular value." if _close(o, W1 + (c["lam"] - 1) * S[j + 1] * torch.outer(U[:, j + 1], Vh[j + 1])) else None,
            ])
            # the property, independent of the formula: singular values change only at j, by the factor lam
            S_got = torch.linalg.svdvals(got.double())
            S_expected = S.double().clone()
            S_expected[j] *= case["lam"]
            check.compare("singular values of the result", S_expected.sort(descending=True).values, S_got, case, atol=1e-4, rtol=1e-3)
