"""WiSE-FT: interpolate the weights of the pretrained (zero-shot) and the fine-tuned model.

Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi, Namkoong, Schmidt 2022,
"Robust fine-tuning of zero-shot models" (CVPR 2022, arXiv 2109.01903)::

    theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1  =  theta_0 + alpha * tau

``alpha = 0`` is the pretrained model, ``alpha = 1`` the fine-tuned one; the paper's default mixing
coefficient is 0.5, and sweeping alpha traces the in-distribution / out-of-distribution frontier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from .._validation import check_bool, check_float
from .base import MergeRule
from .task_vector import TaskVector


@dataclass(frozen=True, repr=False)
class WiSEFT(MergeRule):
    """WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903): ``theta_0 + alpha * (theta_1 - theta_0)``.

    Parameters
    ----------
    alpha : float, default=0.5
        Mixing coefficient: 0 gives the pretrained model, 1 the fine-tuned one (values outside [0, 1]
        extrapolate).
    keep_new_parameters : bool, default=False
        Keep the fine-tuned value of parameters the pretrained model did not have (a new classifier head).
        The paper interpolates the head as well (its zero-shot head comes from the text encoder); with a
        randomly initialised head, set this to True.

    Examples
    --------
    >>> import torch
    >>> WiSEFT(alpha=0.25).merge({"w": torch.zeros(1)}, [{"w": torch.ones(1)}])["w"].tolist()
    [0.25]
    """

    alpha: float = 0.5
    keep_new_parameters: bool = False

    name: ClassVar[str] = "wise_ft"
    paper: ClassVar[str] = "https://arxiv.org/abs/2109.01903"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = 1

    def __post_init__(self):
        check_float(self.alpha, "alpha", "WiSEFT")
        check_bool(self.keep_new_parameters, "keep_new_parameters", "WiSEFT")

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        tau = weights[0] * vectors[0]
        kept = set(tau.new_parameters) if self.keep_new_parameters else set()
        return tau.map(lambda key, t: t if key in kept else self.alpha * t)
