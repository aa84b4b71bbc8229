"""DARE: drop a random share of each task vector's entries and rescale the rest.

Yu, Yu, Yu, Huang, Li 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024, arXiv 2311.03099)::

    m ~ Bernoulli(p) per entry          tau_tilde = (1 - m) * tau / (1 - p)

so that E[tau_tilde] = tau. The sparsified vectors are then combined by task arithmetic (``dare_linear``) or
by TIES' sign election and disjoint mean (``dare_ties``). The paper drops 90-99% of the delta parameters of
large fine-tuned LMs with little loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .._validation import check_bool, check_float, check_int, check_option
from .base import MergeRule
from .task_vector import TaskVector
from .ties import SIGN_METHODS, ties_combine

COMBINES = ("task_arithmetic", "ties")


def drop_and_rescale(vector: TaskVector, p: float, seed: int = 0, rescale: bool = True) -> TaskVector:
    """DARE on one task vector: zero each entry with probability ``p``, divide the survivors by ``1 - p``.

    The same ``seed`` gives the same mask (a CPU ``torch.Generator`` drawn key by key in order).
    """
    check_float(p, "p", "drop_and_rescale", 0.0, 1.0, high_open=True)
    check_int(seed, "seed", "drop_and_rescale")
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 / (1.0 - p) if rescale else 1.0

    def drop(_, t: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(t.shape, generator=generator) >= p  # P(keep) = 1 - p
        return t * keep * scale

    return vector.map(drop)


@dataclass(frozen=True, repr=False)
class DARE(MergeRule):
    """DARE (Yu et al. 2023, arXiv 2311.03099): drop with rate ``p``, rescale by ``1 / (1 - p)``, then combine.

    Parameters
    ----------
    p : float, default=0.9
        Drop rate (the paper sweeps 0.1-0.99; 0.9 is its usual setting).
    lam : float, default=1.0
        Scaling of the combined vector.
    combine : {"task_arithmetic", "ties"}, default="task_arithmetic"
        ``lam * sum_t w_t tau_tilde_t`` (DARE + task arithmetic), or TIES' sign election and disjoint mean
        on the dropped vectors (DARE + TIES, no extra trim).
    rescale : bool, default=True
        Divide the kept entries by ``1 - p`` (False: the "drop only" ablation of the paper).
    sign_method : {"mass", "frequency"}, default="mass"
        Sign election for ``combine="ties"``.
    seed : int, default=0
        Task ``t`` is dropped with seed ``seed + t``.
    """

    p: float = 0.9
    lam: float = 1.0
    combine: str = "task_arithmetic"
    rescale: bool = True
    sign_method: str = "mass"
    seed: int = 0

    name: ClassVar[str] = "dare"
    paper: ClassVar[str] = "https://arxiv.org/abs/2311.03099"

    def __post_init__(self):
        check_float(self.p, "p", "DARE", 0.0, 1.0, high_open=True)
        check_float(self.lam, "lam", "DARE")
        check_option(self.combine, "combine", "DARE", COMBINES)
        check_option(self.sign_method, "sign_method", "DARE", SIGN_METHODS)
        check_bool(self.rescale, "rescale", "DARE")
        check_int(self.seed, "seed", "DARE")

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        dropped = [drop_and_rescale(v, self.p, self.seed + t, self.rescale) for t, v in enumerate(vectors)]
        if self.combine == "ties":
            return self.lam * ties_combine(dropped, weights, self.sign_method)
        return self.lam * sum(w * v for w, v in zip(weights, dropped))
