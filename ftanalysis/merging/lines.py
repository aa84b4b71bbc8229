"""LiNeS: scale a task vector layer by layer, little near the input and fully near the output.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Alahi, Frossard, Fleuret 2025, "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging" (ICLR 2025, arXiv 2410.17146)::

    lambda(l) = alpha + beta * (l - 1) / (L - 1)        for block l = 1..L
    theta = theta_pre + lambda(l) * tau_l   (block parameters)     theta_pre + alpha * tau   (all others)

Shallow layers hold general features that fine-tuning should barely move; deep layers hold the task. For
one fine-tuned model the paper sets ``beta = 1 - alpha`` (the last block keeps its full update) and picks
``alpha``; for a multi-task merge it scales the merged vector, with ``alpha`` from :func:`multitask_alpha`
and ``beta`` tuned.

Handling of the parameters outside the blocks (stated here because the paper's CLIP models have no new head):
embeddings, final norms and a language-model head (tied to the embeddings in the zoo) get ``alpha``, as in
the paper's code. Parameters the pretrained model did not have (a new classifier head, listed by the model's
``new_parameters()``) keep their fine-tuned value by default: scaling them toward a random initialisation has
no meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from .._validation import check_bool, check_float, check_int
from .base import MergeRule
from .task_vector import TaskVector


def lines_factors(n_layers: int, alpha: float, beta: float) -> list[float]:
    """``[lambda(1), ..., lambda(L)]`` with ``lambda(l) = alpha + beta (l - 1) / (L - 1)`` (``alpha + beta`` if L = 1)."""
    if isinstance(n_layers, int) and not isinstance(n_layers, bool) and n_layers < 1:
        raise ValueError(f"LiNeS needs a model with at least one block. Got n_layers={n_layers}.")
    check_int(n_layers, "n_layers", "lines_factors", 1)
    alpha = check_float(alpha, "alpha", "lines_factors")
    beta = check_float(beta, "beta", "lines_factors")
    if n_layers == 1:
        return [alpha + beta]
    return [alpha + beta * (layer - 1) / (n_layers - 1) for layer in range(1, n_layers + 1)]


def multitask_alpha(vectors: Sequence[TaskVector], merged: TaskVector) -> float:
    """The paper's multi-task ``alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T``."""
    total = sum(vectors)
    return (total.norm(1) / max(merged.norm(1), 1e-12)) / len(vectors)


@dataclass(frozen=True, repr=False)
class LiNeS(MergeRule):
    """LiNeS (Wang et al. 2025, arXiv 2410.17146): block ``l`` of the update scaled by ``alpha + beta (l-1)/(L-1)``.

    Parameters
    ----------
    alpha : float, default=0.5
        Scale of the first block's update and of every parameter outside the blocks (embeddings, final norm,
        LM head). The paper sweeps 0..1 for a single task.
    beta : float or None, default=None
        Increase of the scale from the first to the last block. ``None`` means ``1 - alpha`` (the paper's
        single-task choice: the last block keeps its full update).
    rule : MergeRule or None, default=None
        How several fine-tuned models are first merged into one vector (default: their plain sum, i.e. task
        arithmetic with ``lam = 1``). With one model the rule is not used.
    keep_new_parameters : bool, default=True
        Parameters the pretrained model did not have (a new classifier head) keep their fine-tuned value.

    Examples
    --------
    >>> LiNeS(alpha=0.2).factors(6)
    [0.2, 0.36, 0.52, 0.68, 0.84, 1.0]
    """

    alpha: float = 0.5
    beta: float | None = None
    rule: MergeRule | None = field(default=None)
    keep_new_parameters: bool = True

    name: ClassVar[str] = "lines"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.17146"

    def __post_init__(self):
        check_float(self.alpha, "alpha", "LiNeS")
        if self.beta is not None:
            check_float(self.beta, "beta", "LiNeS")
        if self.rule is not None and not isinstance(self.rule, MergeRule):
            raise TypeError(f"The 'rule' parameter of LiNeS must be a MergeRule or None. Got {type(self.rule).__name__}.")
        check_bool(self.keep_new_parameters, "keep_new_parameters", "LiNeS")

    @property
    def effective_beta(self) -> float:
        return 1.0 - self.alpha if self.beta is None else self.beta

    def factors(self, n_layers: int) -> list[float]:
        """The scale of each block's update, rounded to 12 digits."""
        return [round(f, 12) for f in lines_factors(n_layers, self.alpha, self.effective_beta)]

    def scale(self, vector: TaskVector) -> TaskVector:
        """The LiNeS-scaled task vector."""
        if not isinstance(vector, TaskVector):
            raise TypeError(f"LiNeS.scale expects a TaskVector. Got {type(vector).__name__}.")
        factors = lines_factors(vector.n_layers, self.alpha, self.effective_beta) if vector.n_layers else []
        kept = set(vector.new_parameters) if self.keep_new_parameters else set()

        def scaled(key, t):
            if key in kept:
                return t
            layer = vector.layer_of(key)
            return t * (self.alpha if layer is None else factors[layer])

        return vector.map(scaled)

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        if len(vectors) == 1 and weights == [1.0]:
            merged = vectors[0]
        elif self.rule is not None:
            merged = self.rule.merge_vectors(vectors, weights)
        else:
            merged = sum(w * v for w, v in zip(weights, vectors))
        return self.scale(merged)
