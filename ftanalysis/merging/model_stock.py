"""Model Stock: interpolate between the average of a few fine-tunes and the pretrained weights, per layer.

Jang, Yun, Han 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024, arXiv 2403.19522).
For each layer (weight tensor), with ``N`` fine-tuned weights ``w_i`` of one pretrained ``w_0``::

    cos(theta) = mean over pairs i < j of cos(w_i - w_0, w_j - w_0)
    t = N cos(theta) / (1 + (N - 1) cos(theta))
    w = t * mean_i(w_i) + (1 - t) * w_0

so two fine-tunes give ``t = 2 cos / (1 + cos)``. Nearly orthogonal updates (noise) pull the merge toward
the pretrained weights; aligned updates keep the average.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .base import MergeRule
from .task_vector import TaskVector


def stock_ratio(deltas: Sequence[torch.Tensor]) -> float:
    """``t = N cos / (1 + (N - 1) cos)`` for one layer's updates ``w_i - w_0`` (cos = mean pairwise cosine).

    A layer whose updates are all zero (a frozen parameter) gets ``t = 0``; a negative mean cosine is clipped
    to 0 (the formula assumes updates at an angle below 90 degrees; the paper observes about 60-80).
    """
    flat = [d.reshape(-1).float() for d in deltas]
    n = len(flat)
    cosines = []
    for a, b in itertools.combinations(flat, 2):
        denom = a.norm() * b.norm()
        cosines.append(float(a @ b / denom) if denom > 0 else 0.0)
    cos = max(0.0, sum(cosines) / len(cosines))
    return n * cos / (1 + (n - 1) * cos)


@dataclass(frozen=True, repr=False)
class ModelStock(MergeRule):
    """Model Stock (Jang et al. 2024, arXiv 2403.19522): ``w = t * mean(w_i) + (1 - t) * w_0`` per layer.

    No options: ``t`` comes from the geometry of the fine-tuned weights. Needs at least two fine-tunes of one
    pretrained model (the paper uses two). Per-model weights are not part of the rule and must be None.
    """

    name: ClassVar[str] = "model_stock"
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.19522"
    min_models: ClassVar[int] = 2

    def ratios(self, vectors: Sequence[TaskVector]) -> dict[str, float]:
        """``{parameter: t}`` for a list of task vectors."""
        vectors, _ = self._check_vectors(vectors, None)
        return {key: stock_ratio([v[key] for v in vectors]) for key in vectors[0].keys()}

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        if weights is not None:
            raise ValueError("ModelStock does not take per-model weights (its interpolation ratio is computed). Got weights.")
        ratios = self.ratios(vectors)
        mean = sum(vectors) / len(vectors)
        return mean.map(lambda key, t: ratios[key] * t)
