"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal 2023, "TIES-Merging: Resolving Interference When Merging Models"
(NeurIPS 2023, arXiv 2306.01708), Algorithm 1::

    1. Trim:          tau_hat_t = tau_t with all but the top-k% largest |entries| set to 0 (per task, over
                      the whole flattened vector)
    2. Elect sign:    gamma = sign(sum_t tau_hat_t)                 (the sign with the larger total mass)
    3. Disjoint mean: A_p = {t : tau_hat_t^p != 0 and sign(tau_hat_t^p) = gamma^p}
                      tau_m^p = (1 / |A_p|) sum_{t in A_p} w_t tau_hat_t^p
    theta = theta_pre + lam * tau_m

Per-task weights ``w_t`` enter only the disjoint mean, *after* the sign election, as in the paper's
Algorithm 1 and PEFT's ``ties`` (mergekit applied them before the election: mergekit #474).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .._validation import check_float, check_option
from .base import MergeRule, stack, weights_like
from .task_vector import TaskVector

SIGN_METHODS = ("mass", "frequency")
SCOPES = ("global", "tensor")


def trim(vector: TaskVector, k: float, scope: str = "global") -> TaskVector:
    """Keep the top ``k`` fraction of entries by magnitude, zero the rest (TIES step 1).

    ``scope="global"`` ranks entries over the whole task vector (the paper's code); ``"tensor"`` ranks within
    each parameter tensor (PEFT and mergekit). Ties at the threshold are kept, so at least ``k`` is kept.
    """
    check_float(k, "k", "trim", 0.0, 1.0)
    check_option(scope, "scope", "trim", SCOPES)
    if k >= 1.0:
        return vector
    if scope == "tensor":
        return vector.map(lambda _, t: _keep_top(t, k))
    return vector.unflatten(_keep_top(vector.flatten(), k))


def _keep_top(t: torch.Tensor, k: float) -> torch.Tensor:
    n_keep = int(k * t.numel())
    if n_keep == 0:
        return torch.zeros_like(t)
    flat = t.abs().reshape(-1)
    threshold = torch.kthvalue(flat, flat.numel() - n_keep + 1).values  # the n_keep-th largest |entry|
    return t * (t.abs() >= threshold)


def sign_score(stacked: torch.Tensor, method: str = "mass") -> torch.Tensor:
    """The election score per entry: the sum (``"mass"``) or the sum of signs (``"frequency"``) over tasks."""
    check_option(method, "method", "sign_score", SIGN_METHODS)
    return stacked.sum(0) if method == "mass" else torch.sign(stacked).sum(0)


def elect_sign(stacked: torch.Tensor, method: str = "mass", majority: float | None = None) -> torch.Tensor:
    """The elected sign per entry, ``[*shape]`` of +-1, from trimmed vectors stacked ``[tasks, *shape]`` (step 2).

    ``"mass"``: sign of the sum (the paper); ``"frequency"``: sign of the sum of signs (a majority vote).
    Entries whose score is exactly 0 take ``majority`` (default: the sign of the summed signs of this tensor;
    :class:`TIES` passes the sign over the whole task vector, as the paper's code does).
    """
    sign = torch.sign(sign_score(stacked, method))
    if majority is None:
        majority = 1.0 if float(sign.sum()) >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean over the tasks whose entry is nonzero and agrees with the elected sign (step 3).

    ``stacked`` is ``[tasks, *shape]``; weights multiply the agreeing entries (after the election).
    """
    agree = (torch.sign(stacked) == sign.unsqueeze(0)) & (stacked != 0)  # [tasks, *shape]
    if weights is not None:
        stacked = stacked * weights_like(weights, stacked)
    total = (stacked * agree).sum(0)
    count = agree.sum(0).clamp_min(1)
    return total / count


@dataclass(frozen=True, repr=False)
class TIES(MergeRule):
    """TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint mean, scale by ``lam``.

    Parameters
    ----------
    k : float, default=0.2
        Fraction of each task vector's entries kept by magnitude (the paper's top-k% with k = 20).
    lam : float, default=1.0
        Scaling of the merged vector (the paper tunes it on validation data in 0.1..1.5 and uses 1.0 when
        none is available).
    sign_method : {"mass", "frequency"}, default="mass"
        How the sign is elected: the sign of the total mass (the paper) or of the count (a majority vote).
    trim_scope : {"global", "tensor"}, default="global"
        Rank entries over each whole task vector (the paper's code) or within each tensor (PEFT, mergekit).

    Examples
    --------
    >>> import torch
    >>> base = {"w": torch.zeros(3)}
    >>> a, b = {"w": torch.tensor([1.0, -2.0, 0.5])}, {"w": torch.tensor([3.0, 1.0, -0.5])}
    >>> TIES(k=1.0).merge(base, [a, b])["w"].tolist()  # signs: +, - (mass -1), + (tie -> majority +)
    [2.0, -2.0, 0.5]
    """

    k: float = 0.2
    lam: float = 1.0
    sign_method: str = "mass"
    trim_scope: str = "global"

    name: ClassVar[str] = "ties"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    min_models: ClassVar[int] = 1

    def __post_init__(self):
        check_float(self.k, "k", "TIES", 0.0, 1.0, low_open=True)
        check_float(self.lam, "lam", "TIES")
        check_option(self.sign_method, "sign_method", "TIES", SIGN_METHODS)
        check_option(self.trim_scope, "trim_scope", "TIES", SCOPES)

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        trimmed = [trim(v, self.k, self.trim_scope) for v in vectors]
        return self.lam * ties_combine(trimmed, weights, self.sign_method)


def ties_combine(vectors: Sequence[TaskVector], weights: Sequence[float], sign_method: str = "mass") -> TaskVector:
    """Steps 2 and 3 of TIES on already sparsified vectors: elect the sign per entry, then the disjoint mean."""
    keys = list(vectors[0].keys())
    total = sum(float(torch.sign(sign_score(stack(vectors, key), sign_method)).sum()) for key in keys)
    majority = 1.0 if total >= 0 else -1.0  # for entries whose score is exactly 0
    merged = {}
    for key in keys:
        stacked = stack(vectors, key)  # [tasks, *shape]
        sign = elect_sign(stacked, sign_method, majority)  # elected on the unweighted vectors (Algorithm 1)
        merged[key] = disjoint_mean(stacked, sign, weights)
    return vectors[0].like(merged)
