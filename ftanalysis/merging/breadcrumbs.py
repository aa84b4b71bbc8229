"""Model Breadcrumbs: per layer, mask both the largest (outlier) and the smallest entries of each task vector.

Davari and Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"
(ECCV 2024, arXiv 2312.06795)::

    per layer (weight tensor) of tau_t: drop the top beta fraction by |tau| (outliers), and the bottom gamma
    fraction (negligible entries); keep the 1 - beta - gamma in between
    theta = theta_pre + lam * sum_t w_t * (m_t * tau_t)

Naming of the two fractions across implementations: the official code (``TaskVectorMiddleKeep``) calls them
``top_k_remove`` (= beta) and ``top_k_keep`` (= 1 - beta - gamma) and masks each *row* (last dimension);
mergekit's ``breadcrumbs`` calls the top fraction ``gamma`` and the kept fraction ``density`` and masks each
tensor. Here ``granularity`` chooses between the paper's per-layer mask and the official per-row mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .._validation import check_float, check_option
from .base import MergeRule
from .task_vector import TaskVector
from .ties import SIGN_METHODS, ties_combine

GRANULARITIES = ("layer", "row")
COMBINES = ("task_arithmetic", "ties")


def breadcrumbs_mask(t: torch.Tensor, beta: float, gamma: float, granularity: str = "layer") -> torch.Tensor:
    """Boolean mask of the entries kept by Breadcrumbs: neither in the top ``beta`` nor the bottom ``gamma`` by |t|.

    Ranks are taken over the whole tensor (``"layer"``) or within each row, i.e. along the last dimension
    (``"row"``, the official code). Per group of ``n`` entries, the ``int(beta * n)`` largest and the
    ``int(gamma * n)`` smallest are dropped. Per row, ties are broken by position (exactly
    ``n - int(beta n) - int(gamma n)`` kept); per layer, by value (entries equal to a threshold, such as the
    exact zeros of embedding rows that never received a gradient, are dropped together), which avoids
    sorting tensors of millions of entries.
    """
    check_float(beta, "beta", "breadcrumbs_mask", 0.0, 1.0)
    check_float(gamma, "gamma", "breadcrumbs_mask", 0.0, 1.0)
    check_option(granularity, "granularity", "breadcrumbs_mask", GRANULARITIES)
    if beta + gamma > 1.0:
        raise ValueError(f"Breadcrumbs needs beta + gamma <= 1 (top and bottom fractions dropped). Got {beta} + {gamma}.")
    if t.ndim == 0:
        return torch.ones_like(t, dtype=torch.bool)
    if granularity == "layer":
        flat = t.abs().reshape(-1)
        n = flat.numel()
        n_top, n_bottom = int(beta * n), int(gamma * n)
        keep = torch.ones_like(flat, dtype=torch.bool)
        if n_top:
            keep &= flat < torch.kthvalue(flat, n - n_top + 1).values  # below the n_top-th largest
        if n_bottom:
            keep &= flat > torch.kthvalue(flat, n_bottom).values  # above the n_bottom-th smallest
        return keep.reshape(t.shape)
    groups = t.abs().reshape(-1, t.shape[-1])  # [rows, n]
    n = groups.shape[1]
    n_top, n_bottom = int(beta * n), int(gamma * n)
    ranks = groups.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)  # 0 = largest
    keep = (ranks >= n_top) & (ranks < n - n_bottom)
    return keep.reshape(t.shape)


def breadcrumbs_sparsify(vector: TaskVector, beta: float, gamma: float, granularity: str = "layer") -> TaskVector:
    """``m * tau`` with the :func:`breadcrumbs_mask` of every tensor."""
    return vector.map(lambda _, t: t * breadcrumbs_mask(t, beta, gamma, granularity))


@dataclass(frozen=True, repr=False)
class Breadcrumbs(MergeRule):
    """Model Breadcrumbs (Davari and Belilovsky 2023, arXiv 2312.06795): middle-band masks, then task arithmetic.

    Parameters
    ----------
    beta : float, default=0.01
        Fraction of each layer's largest |tau| entries dropped (the outliers).
    gamma : float, default=0.85
        Fraction of each layer's smallest |tau| entries dropped; ``1 - beta - gamma`` of the entries are kept.
    lam : float, default=1.0
        Scaling of the summed masked vectors (the paper tunes it; 1 / T is averaging).
    granularity : {"layer", "row"}, default="layer"
        Rank within each tensor (the paper's "per layer") or within each row (the official code).
    combine : {"task_arithmetic", "ties"}, default="task_arithmetic"
        Sum the masked vectors (Breadcrumbs) or elect signs and take the disjoint mean (mergekit's
        ``breadcrumbs_ties``).
    sign_method : {"mass", "frequency"}, default="mass"
        Sign election for ``combine="ties"``.
    """

    beta: float = 0.01
    gamma: float = 0.85
    lam: float = 1.0
    granularity: str = "layer"
    combine: str = "task_arithmetic"
    sign_method: str = "mass"

    name: ClassVar[str] = "breadcrumbs"
    paper: ClassVar[str] = "https://arxiv.org/abs/2312.06795"

    def __post_init__(self):
        check_float(self.beta, "beta", "Breadcrumbs", 0.0, 1.0)
        check_float(self.gamma, "gamma", "Breadcrumbs", 0.0, 1.0)
        if self.beta + self.gamma >= 1.0:
            raise ValueError(f"Breadcrumbs keeps 1 - beta - gamma of the entries: beta + gamma must be < 1. Got {self.beta} + {self.gamma}.")
        check_float(self.lam, "lam", "Breadcrumbs")
        check_option(self.granularity, "granularity", "Breadcrumbs", GRANULARITIES)
        check_option(self.combine, "combine", "Breadcrumbs", COMBINES)
        check_option(self.sign_method, "sign_method", "Breadcrumbs", SIGN_METHODS)

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        masked = [breadcrumbs_sparsify(v, self.beta, self.gamma, self.granularity) for v in vectors]
        if self.combine == "ties":
            return self.lam * ties_combine(masked, weights, self.sign_method)
        return self.lam * sum(w * v for w, v in zip(weights, masked))
