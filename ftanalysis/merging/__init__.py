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

from .._lazy import lazy_attributes

# Names are imported on first use (PEP 562), so ``ftanalysis merge --help`` does not pay for torch.
_NAMES = {
    "TaskArithmetic": ".arithmetic", "MergeRule": ".base",
    "Breadcrumbs": ".breadcrumbs", "breadcrumbs_mask": ".breadcrumbs", "breadcrumbs_sparsify": ".breadcrumbs",
    "DARE": ".dare", "drop_and_rescale": ".dare",
    "PRESETS": ".generalized", "GeneralizedMerge": ".generalized",
    "LiNeS": ".lines", "lines_factors": ".lines", "multitask_alpha": ".lines",
    "ModelStock": ".model_stock", "stock_ratio": ".model_stock",
    "GreedySoup": ".soups", "GreedySoupResult": ".soups", "UniformSoup": ".soups",
    "TaskVector": ".task_vector", "check_compatible": ".task_vector", "materialize": ".task_vector",
    "sign_conflicts": ".task_vector", "task_vectors": ".task_vector",
    "TIES": ".ties", "disjoint_mean": ".ties", "elect_sign": ".ties", "trim": ".ties",
    "WiSEFT": ".wise_ft",
}

# The shipped rules: registry name -> class name (each class's ``name`` attribute; a test checks they agree).
BUILTIN_RULES = {
    "breadcrumbs": "Breadcrumbs", "dare": "DARE", "generalized": "GeneralizedMerge", "greedy_soup": "GreedySoup",
    "lines": "LiNeS", "model_stock": "ModelStock", "task_arithmetic": "TaskArithmetic", "ties": "TIES",
    "uniform_soup": "UniformSoup", "wise_ft": "WiSEFT",
}

_REGISTRY: dict = {}


__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)


def _registry() -> dict:
    """The registry, with the shipped rules imported on first use."""
    for rule_name, class_name in BUILTIN_RULES.items():
        if rule_name not in _REGISTRY:
            _REGISTRY[rule_name] = globals().get(class_name) or __getattr__(class_name)
    return _REGISTRY


def rule_names() -> list[str]:
    """The registered rules' names, without importing them (what ``ftanalysis merge --help`` lists)."""
    return sorted(set(BUILTIN_RULES) | set(_REGISTRY))


def register(cls):
    """Add a rule class to the registry under ``cls.name`` (its paper URL is ``cls.paper``)."""
    registry = _registry()
    if cls.name in registry and registry[cls.name] is not cls:
        raise ValueError(f"A merging rule named {cls.name!r} is already registered.")
    registry[cls.name] = cls
    return cls


def available() -> dict[str, str]:
    """``{name: paper URL}`` of every registered merging rule."""
    return {name: cls.paper for name, cls in sorted(_registry().items())}


def get(name: str):
    """The rule class registered under ``name``."""
    registry = _registry()
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"Unknown merging rule {name!r}. Available: {sorted(registry)}.")
    return registry[name]


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
    "materialize", "merge", "multitask_alpha", "register", "rule_names", "sign_conflicts", "stock_ratio", "task_vectors", "trim",
]
