"""Task vectors and model-merging rules (task arithmetic, TIES, DARE, Breadcrumbs, LiNeS, soups, Model Stock).

Every rule is a small config object named as in its paper; ``rule.merge(base, models)`` returns a new model
(``models`` may be fine-tuned models, state dicts, checkpoint folders, or fine-tuning results, LoRA ones
merged first) and ``rule.merge_vectors(task_vectors)`` works on updates.

>>> import ftanalysis as fta
>>> sorted(fta.merging.available())[:3]
['breadcrumbs', 'dare', 'generalized']
>>> rule = fta.merging.get("ties")(k=0.2, lam=1.0)
"""

from __future__ import annotations

import dataclasses

from .arithmetic import TaskArithmetic
from .base import MergeRule
from .breadcrumbs import Breadcrumbs, breadcrumbs_mask, breadcrumbs_sparsify
from .dare import DARE, drop_and_rescale
from .generalized import PRESETS, GeneralizedMerge
from .lines import LiNeS, lines_factors, multitask_alpha
from .model_stock import ModelStock, stock_ratio
from .soups import GreedySoup, GreedySoupResult, UniformSoup
from .task_vector import TaskVector, check_compatible, materialize, sign_conflicts, task_vectors
from .ties import TIES, disjoint_mean, elect_sign, trim
from .wise_ft import WiSEFT

_REGISTRY: dict[str, type[MergeRule]] = {}


def register(cls: type[MergeRule]) -> type[MergeRule]:
    """Add a rule class to the registry under ``cls.name`` (its paper URL is ``cls.paper``)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A merging rule named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (TaskArithmetic, UniformSoup, GreedySoup, WiSEFT, TIES, DARE, Breadcrumbs, LiNeS, ModelStock, GeneralizedMerge):
    register(_cls)


def available() -> dict[str, str]:
    """``{name: paper URL}`` of every registered merging rule."""
    return {name: cls.paper for name, cls in sorted(_REGISTRY.items())}


def get(name: str) -> type[MergeRule]:
    """The rule class registered under ``name``."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"Unknown merging rule {name!r}. Available: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def merge(name: str, base, models, weights=None, **options):
    """``get(name)(**options).merge(base, models, weights)``: e.g. ``merge("ties", base, [ft1, ft2], k=0.2)``."""
    cls = get(name)
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"The merging rule {name!r} got unknown option(s) {unknown}. Accepted options: {accepted}.")
    return cls(**options).merge(base, models, weights)


__all__ = [
    "DARE", "PRESETS", "TIES", "Breadcrumbs", "GeneralizedMerge", "GreedySoup", "GreedySoupResult", "LiNeS", "MergeRule",
    "ModelStock", "TaskArithmetic", "TaskVector", "UniformSoup", "WiSEFT", "available", "breadcrumbs_mask",
    "breadcrumbs_sparsify", "check_compatible", "disjoint_mean", "drop_and_rescale", "elect_sign", "get", "lines_factors",
    "materialize", "merge", "multitask_alpha", "register", "sign_conflicts", "stock_ratio", "task_vectors", "trim",
]
