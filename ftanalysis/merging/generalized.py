"""One generalised rule over (sparsify, elect sign, combine, scale), with named presets (mergekit style).

Task arithmetic, TIES, DARE and Breadcrumbs are the same four steps with different choices::

    1. sparsify each tau_t:  none | "magnitude" (keep top density) | "random" (DARE: drop 1 - density,
                             rescale by 1/density) | "breadcrumbs" (drop top beta and bottom gamma)
    2. elect sign:           none | "mass" | "frequency"         (on the unweighted sparsified vectors)
    3. combine:              sum_t w_t tau_t, or the disjoint mean over sign-agreeing entries if a sign was elected
    4. scale:                theta = theta_pre + lam * tau_merged

The order of the steps follows the papers (sign election before weighting: TIES Algorithm 1). The named
classes (:class:`TIES`, :class:`DARE`, :class:`Breadcrumbs`) keep each paper's option names; this rule is for
exploring combinations (``GeneralizedMerge.preset("dare_ties", density=0.1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from .._validation import check_bool, check_float, check_int, check_option
from .base import MergeRule
from .breadcrumbs import breadcrumbs_sparsify
from .dare import drop_and_rescale
from .task_vector import TaskVector
from .ties import SCOPES, SIGN_METHODS, ties_combine, trim

SPARSIFIERS = (None, "magnitude", "random", "breadcrumbs")

PRESETS: dict[str, dict] = {
    "task_arithmetic": {"sparsify": None, "sign": None},
    "ties": {"sparsify": "magnitude", "sign": "mass", "density": 0.2},
    "dare_linear": {"sparsify": "random", "sign": None, "density": 0.1},
    "dare_ties": {"sparsify": "random", "sign": "mass", "density": 0.1},
    "breadcrumbs": {"sparsify": "breadcrumbs", "sign": None, "beta": 0.01, "gamma": 0.85},
    "breadcrumbs_ties": {"sparsify": "breadcrumbs", "sign": "mass", "beta": 0.01, "gamma": 0.85},
}


@dataclass(frozen=True, repr=False)
class GeneralizedMerge(MergeRule):
    """Sparsify, elect sign, combine, scale: the family behind task arithmetic, TIES, DARE and Breadcrumbs.

    Parameters
    ----------
    sparsify : {None, "magnitude", "random", "breadcrumbs"}, default=None
    density : float, default=1.0
        Fraction kept by ``"magnitude"`` (TIES' k) or ``"random"`` (DARE's 1 - p).
    beta, gamma : float, default=0.01, 0.85
        Top and bottom fractions dropped per layer by ``"breadcrumbs"``.
    sign : {None, "mass", "frequency"}, default=None
        Sign election; with one, the combination is TIES' disjoint mean, without, a weighted sum.
    lam : float, default=1.0
    trim_scope : {"global", "tensor"}, default="global"
        Where ``"magnitude"`` ranks entries.
    rescale : bool, default=True
        ``"random"`` divides the kept entries by ``density``.
    seed : int, default=0
    """

    sparsify: str | None = None
    density: float = 1.0
    beta: float = 0.01
    gamma: float = 0.85
    sign: str | None = None
    lam: float = 1.0
    trim_scope: str = "global"
    rescale: bool = True
    seed: int = 0

    name: ClassVar[str] = "generalized"
    paper: ClassVar[str] = "https://github.com/arcee-ai/mergekit"

    def __post_init__(self):
        check_option(self.sparsify, "sparsify", "GeneralizedMerge", SPARSIFIERS)
        check_float(self.density, "density", "GeneralizedMerge", 0.0, 1.0, low_open=True)
        check_float(self.beta, "beta", "GeneralizedMerge", 0.0, 1.0)
        check_float(self.gamma, "gamma", "GeneralizedMerge", 0.0, 1.0)
        check_option(self.sign, "sign", "GeneralizedMerge", (None, *SIGN_METHODS))
        check_float(self.lam, "lam", "GeneralizedMerge")
        check_option(self.trim_scope, "trim_scope", "GeneralizedMerge", SCOPES)
        check_bool(self.rescale, "rescale", "GeneralizedMerge")
        check_int(self.seed, "seed", "GeneralizedMerge")
        if self.sparsify == "breadcrumbs" and self.beta + self.gamma >= 1.0:
            raise ValueError(
                "GeneralizedMerge(sparsify='breadcrumbs') keeps 1 - beta - gamma of the entries: beta + gamma must be "
                f"< 1. Got {self.beta} + {self.gamma}."
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> "GeneralizedMerge":
        """A named preset (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
        ``breadcrumbs_ties``) with options overridden."""
        check_option(name, "name", "GeneralizedMerge.preset", sorted(PRESETS))
        return cls(**{**PRESETS[name], **overrides})

    def _sparsify(self, vector: TaskVector, t: int) -> TaskVector:
        if self.sparsify == "magnitude":
            return trim(vector, self.density, self.trim_scope)
        if self.sparsify == "random":
            return drop_and_rescale(vector, 1.0 - self.density, self.seed + t, self.rescale)
        if self.sparsify == "breadcrumbs":
            return breadcrumbs_sparsify(vector, self.beta, self.gamma)
        return vector

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, weights = self._check_vectors(vectors, weights)
        sparse = [self._sparsify(v, t) for t, v in enumerate(vectors)]
        if self.sign is not None:
            return self.lam * ties_combine(sparse, weights, self.sign)
        return self.lam * sum(w * v for w, v in zip(weights, sparse))
