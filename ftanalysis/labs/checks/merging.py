"""Checks for lab 05, model merging: TIES (trim, elect sign, disjoint mean) and DARE (drop, rescale).

The exercises work on task vectors flattened to one tensor, ``[entries]`` or stacked ``[tasks, entries]``.
Expected values come from :mod:`ftanalysis.merging` (``trim``, ``elect_sign``, ``disjoint_mean``, ``TIES``,
``drop_and_rescale``) applied to the same numbers wrapped as :class:`~ftanalysis.merging.TaskVector`. The
seeded vectors have *built-in sign conflicts*: on some entries one task pushes hard one way and the other
tasks push weakly the other way, so electing by mass and voting by count give different signs, and a merge
that skips the election differs from TIES.
"""

from __future__ import annotations

import torch

from ...merging import TIES, TaskVector, disjoint_mean, drop_and_rescale, elect_sign, trim
from ._core import factor_hint, resolve, running, seeded


# ---------------------------------------------------------------------- references (the library)
def _tv(flat: torch.Tensor) -> TaskVector:
    return TaskVector({"w": flat.detach().float().cpu()})


def reference_trim(tau: torch.Tensor, k: float) -> torch.Tensor:
    return trim(_tv(tau), k).flatten().to(tau)


def reference_elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    return elect_sign(stacked.detach().float().cpu(), "mass").to(stacked)


def reference_disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return disjoint_mean(stacked.detach().float().cpu(), sign.detach().float().cpu()).to(stacked)


def reference_ties_merge(taus: torch.Tensor, k: float, lam: float) -> torch.Tensor:
    return TIES(k=k, lam=lam).merge_vectors([_tv(t) for t in taus]).flatten().to(taus)


def reference_dare(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    seed = generator.initial_seed()
    return drop_and_rescale(_tv(tau), p, seed=seed).flatten().to(tau)


# ---------------------------------------------------------------------- seeded task vectors
def conflicting_vectors(n_tasks: int, n: int, seed: int, zeros: float = 0.0) -> torch.Tensor:
    """``[n_tasks, n]`` task vectors, a third of whose entries are planted sign conflicts: one task large and
    positive (or negative), the others smaller and of the opposite sign, so mass and majority disagree."""
    g = seeded(seed)
    taus = torch.randn(n_tasks, n, generator=g)
    planted = torch.randperm(n, generator=g)[: n // 3]
    for j in planted.tolist():
        big = int(torch.randint(0, n_tasks, (1,), generator=g))
        direction = 1.0 if torch.rand(1, generator=g) < 0.5 else -1.0
        small = 0.2 + 0.3 * torch.rand(n_tasks, generator=g)
        taus[:, j] = -direction * small
        taus[big, j] = direction * (n_tasks + torch.rand(1, generator=g))
    if zeros:
        taus = taus * (torch.rand(n_tasks, n, generator=g) >= zeros)
    return taus


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4)


def _tensor(check, case, got, name: str) -> None:
    check.require(isinstance(got, torch.Tensor), case, f"{name} must return a tensor. Got {type(got).__name__}.")


# ---------------------------------------------------------------------- checks
def check_trim(trim_topk=None) -> None:
    """``trim_topk(tau, k)``: keep the ``int(k * n)`` entries of largest magnitude of the 1-D ``tau``, zero the
    rest (TIES step 1; ``k`` is a fraction)."""
    fn = resolve(trim_topk, reference_trim, "check_trim", "function", ["tau", "k"])
    cases = [{"seed": s, "n": n, "k": k} for s, (n, k) in enumerate([(50, 0.2), (200, 0.1), (37, 0.5), (64, 1.0), (120, 0.05)])]
    with running("check_trim") as check:
        for case in check.cases(cases):
            tau = torch.randn(case["n"], generator=seeded(case["seed"])) * 2
            expected = reference_trim(tau, case["k"])
            got = fn(tau.clone(), case["k"])
            _tensor(check, case, got, "trim_topk")
            n_keep = int(case["k"] * case["n"])
            check.compare("trimmed vector", expected, got, case, hints=[
                lambda e, o, c: f"keep exactly int(k * n) = {n_keep} entries (k is a fraction); you kept {int((o != 0).sum())}."
                if o.shape == e.shape and int((o != 0).sum()) != n_keep else None,
                lambda e, o, c: "rank entries by magnitude |tau|, not by signed value." if _close(o, tau * (tau >= tau.topk(n_keep).values.min())) else None,
                lambda e, o, c: "keep the entries of *largest* magnitude (you kept the smallest)."
                if _close(o.abs() > 0, tau.abs() <= tau.abs().sort().values[n_keep - 1]) else None,
                lambda e, o, c: "return tau * mask, the kept values, not the 0/1 mask." if _close(o, (e != 0).to(o.dtype)) else None,
            ])


def check_elect_sign(elect_sign_fn=None) -> None:
    """``elect_sign(stacked)``: for ``[tasks, n]`` task vectors, the ``[n]`` sign (+1 or -1) of the total mass
    ``sum_t tau_t`` per entry (TIES step 2)."""
    fn = resolve(elect_sign_fn, reference_elect_sign, "check_elect_sign", "function", ["stacked"])
    cases = [{"seed": s, "tasks": t, "n": n} for s, (t, n) in enumerate([(3, 60), (2, 30), (5, 90), (4, 45)])]
    with running("check_elect_sign") as check:
        for case in check.cases(cases):
            stacked = conflicting_vectors(case["tasks"], case["n"], seed=10 + case["seed"])
            expected = reference_elect_sign(stacked)
            got = fn(stacked.clone())
            _tensor(check, case, got, "elect_sign")
            check.compare("elected sign", expected, got, case, hints=[
                lambda e, o, c: "return one sign per entry, shape [n]: reduce over the tasks axis (dim 0)."
                if o.shape != e.shape else None,
                lambda e, o, c: "elect by total mass, the sign of the sum of the values, not by counting signs (a majority vote)."
                if _close(o, torch.sign(torch.sign(stacked).sum(0))) else None,
                lambda e, o, c: "return the sign (+1 or -1) of the sum, not the sum itself." if _close(o, stacked.sum(0)) else None,
                lambda e, o, c: "elect per entry over all tasks, not copy the first task's sign." if _close(o, torch.sign(stacked[0])) else None,
            ])


def check_disjoint_mean(disjoint_mean_fn=None) -> None:
    """``disjoint_mean(stacked, sign)``: per entry, the mean of the tasks' values that are nonzero and agree
    with ``sign``; 0 where none agrees (TIES step 3)."""
    fn = resolve(disjoint_mean_fn, reference_disjoint_mean, "check_disjoint_mean", "function", ["stacked", "sign"])
    cases = [{"seed": s, "tasks": t, "n": n, "zeros": z} for s, (t, n, z) in enumerate([(3, 60, 0.5), (2, 40, 0.3), (4, 80, 0.7), (3, 30, 0.0)])]
    with running("check_disjoint_mean") as check:
        for case in check.cases(cases):
            stacked = conflicting_vectors(case["tasks"], case["n"], seed=20 + case["seed"], zeros=case["zeros"])
            sign = elect_sign(stacked, "mass")
            expected = reference_disjoint_mean(stacked, sign)
            got = fn(stacked.clone(), sign.clone())
            _tensor(check, case, got, "disjoint_mean")
            agree = (torch.sign(stacked) == sign) & (stacked != 0)
            same_sign_or_zero = stacked * sign >= 0
            check.compare("disjoint mean", expected, got, case, hints=[
                lambda e, o, c: "average only the entries that agree with the elected sign (you averaged every task)."
                if _close(o, stacked.mean(0)) else None,
                lambda e, o, c: "divide by the number of agreeing tasks per entry, not by the number of tasks."
                if _close(o, (stacked * agree).sum(0) / c["tasks"]) else None,
                lambda e, o, c: "zero (trimmed) entries do not vote: count only nonzero entries that agree."
                if _close(o, (stacked * same_sign_or_zero).sum(0) / same_sign_or_zero.sum(0).clamp_min(1)) else None,
                lambda e, o, c: "where no task agrees the result is 0, not NaN: clamp the count to at least 1." if not torch.isfinite(o).all() else None,
            ])


def check_ties_merge(ties_merge=None) -> None:
    """``ties_merge(taus, k, lam)``: TIES on ``[tasks, n]`` task vectors: trim each to its top ``k`` fraction,
    elect the sign per entry, take the disjoint mean, multiply by ``lam``; compared with
    :class:`ftanalysis.merging.TIES`."""
    fn = resolve(ties_merge, reference_ties_merge, "check_ties_merge", "function", ["taus", "k", "lam"])
    cases = [{"seed": s, "tasks": t, "n": n, "k": k, "lam": lam}
             for s, (t, n, k, lam) in enumerate([(3, 90, 0.5, 1.0), (2, 60, 0.3, 0.7), (4, 120, 0.6, 1.3), (3, 45, 1.0, 1.0)])]
    with running("check_ties_merge") as check:
        for case in check.cases(cases):
            taus = conflicting_vectors(case["tasks"], case["n"], seed=30 + case["seed"])
            expected = reference_ties_merge(taus, case["k"], case["lam"])
            got = fn(taus.clone(), case["k"], case["lam"])
            _tensor(check, case, got, "ties_merge")
            trimmed = torch.stack([reference_trim(t, case["k"]) for t in taus])
            nonzero = (trimmed != 0).sum(0).clamp_min(1)
            untrimmed = case["lam"] * disjoint_mean(taus, elect_sign(taus, "mass"))
            check.compare("merged vector", expected, got, case, hints=[
                factor_hint(lambda c: 1 / c["lam"], "multiply the merged vector by lam."),
                lambda e, o, c: "elect the sign before averaging: you averaged the trimmed values of every sign (no sign election)."
                if _close(o, c["lam"] * trimmed.sum(0) / nonzero) or _close(o, c["lam"] * trimmed.mean(0)) else None,
                lambda e, o, c: "trim each task vector to its top k fraction first." if _close(o, untrimmed) else None,
                lambda e, o, c: "merging is not summing: take the disjoint mean of the agreeing entries."
                if _close(o, c["lam"] * trimmed.sum(0)) else None,
            ])


def check_dare(dare=None) -> None:
    """``dare(tau, p, generator)``: draw ``u = torch.rand(tau.shape, generator=generator)``, keep entries with
    ``u >= p`` (drop with probability ``p``) and divide them by ``1 - p``; compared with
    :func:`ftanalysis.merging.drop_and_rescale` for the same seed, then checked to be unbiased."""
    fn = resolve(dare, reference_dare, "check_dare", "function", ["tau", "p", "generator"])
    cases = [{"seed": s, "n": n, "p": p} for s, (n, p) in enumerate([(100, 0.9), (64, 0.5), (300, 0.3), (50, 0.75)])]
    cases.append({"property": "E[dare(tau)] = tau", "p": 0.8, "draws": 1000})
    with running("check_dare") as check:
        for case in check.cases(cases):
            if "property" in case:  # unbiasedness: the mean over many draws approaches tau, whatever the seeds
                tau = torch.where(torch.rand(20, generator=seeded(99)) < 0.5, -1.0, 1.0)
                mean = torch.stack([fn(tau.clone(), case["p"], seeded(1000 + i)) for i in range(case["draws"])]).mean(0)
                # each entry's mean has standard deviation sqrt(p / (1 - p) / draws) = 0.063: atol 0.3 is ~5 sigma
                check.compare("mean of dare over 1000 draws", tau, mean, case, atol=0.3, rtol=0.0,
                              hints=[lambda e, o, c: "the average is biased: divide the kept entries by 1 - p."])
                continue
            tau = torch.randn(case["n"], generator=seeded(40 + case["seed"]))
            expected = reference_dare(tau, case["p"], seeded(case["seed"]))
            got = fn(tau.clone(), case["p"], seeded(case["seed"]))
            _tensor(check, case, got, "dare")
            kept = torch.rand(case["n"], generator=seeded(case["seed"])) >= case["p"]
            check.compare("dropped and rescaled vector", expected, got, case, hints=[
                factor_hint(lambda c: 1 - c["p"], "rescale the kept entries by 1 / (1 - p), so that E[dare(tau)] = tau."),
                factor_hint(lambda c: (1 - c["p"]) / c["p"], "rescale by 1 / (1 - p), the keep probability, not by 1 / p."),
                lambda e, o, c: "p is the drop probability: keep the entries whose draw is >= p."
                if o.shape == e.shape and torch.equal(o != 0, ~kept & (tau != 0)) else None,
                lambda e, o, c: "draw the mask with the given generator: torch.rand(tau.shape, generator=generator)."
                if o.shape == e.shape and not torch.equal(o != 0, kept & (tau != 0)) else None,
            ])
