"""Task arithmetic: add scaled task vectors to the pretrained weights.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi 2023, "Editing Models with Task
Arithmetic" (ICLR 2023, arXiv 2212.04089)::

    theta = theta_pre + lam * sum_t w_t * tau_t          tau_t = theta_t - theta_pre

Negating a task vector (``lam < 0`` or ``-tau``) removes a behaviour ("forgetting via negation").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from .._validation import check_float
from .base import MergeRule
from .task_vector import TaskVector


@dataclass(frozen=True, repr=False)
class TaskArithmetic(MergeRule):
    """``theta = theta_pre + lam * sum_t w_t tau_t`` (Ilharco et al. 2023, arXiv 2212.04089).

    Parameters
    ----------
    lam : float, default=1.0
        The scaling coefficient lambda. The paper tunes it on validation data (their README uses 0.5 for
        negation and 0.8 for the sum of two tasks); with T tasks, ``lam = 1 / T`` is plain averaging.

    Examples
    --------
    >>> import torch
    >>> base = {"w": torch.zeros(2)}
    >>> TaskArithmetic(lam=0.5).merge(base, [{"w": torch.ones(2)}, {"w": torch.ones(2)}])["w"].tolist()
    [1.0, 1.0]
    """

    lam: float = 1.0

    name: ClassVar[str] = "task_arithmetic"
    paper: ClassVar[str] = "https://arxiv.org/abs/2212.04089"

    def __post_init__(self):
        check_float(self.lam, "lam", "TaskArithmetic")

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        total = sum(w * v for w, v in zip(weights, vectors))
        return self.lam * total
