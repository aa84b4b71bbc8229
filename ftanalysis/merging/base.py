"""The merging-rule contract: a small config object that combines fine-tuned models into one.

Every rule is a frozen dataclass of options (named as in its paper, validated in ``__post_init__``) with

- ``merge(base, models, weights=None)``: the merged model (a new model when ``base`` is a model, a state dict
  when it is one). ``models`` are fine-tuned models, state dicts, checkpoint folders, fine-tuning results (a
  LoRA result is merged first) or :class:`TaskVector` objects; none of them is modified.
- ``merge_vectors(vectors, weights=None)``: the rule in task-vector space, ``[tau_t] -> tau_merged``, for rules
  that work on updates (task arithmetic, TIES, DARE, Breadcrumbs, LiNeS, Model Stock, WiSE-FT).

``rule(base, models)`` is ``rule.merge(base, models)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Sequence

import torch

from .._validation import check_float
from .task_vector import TaskVector, check_finite, materialize, task_vectors


@dataclass(frozen=True)
class MergeRule:
    """Base class of the merging rules (see the module docstring for the contract)."""

    name: ClassVar[str] = "rule"
    paper: ClassVar[str] = ""
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def merge(self, base, models: Sequence, weights: Sequence[float] | None = None):
        """Merge fine-tuned ``models`` of ``base`` into one; returns a new model (or a state dict)."""
        owner = f"{type(self).__name__}.merge"
        models = self._check_models(models)
        base = materialize(base, owner)
        vectors = task_vectors(base, models, owner)
        merged = self.merge_vectors(vectors, weights=weights)
        check_finite(merged, f"The merged update of {owner} (finite inputs, so an overflow: lower 'lam' or the weights)")
        return merged.apply_to(base)

    __call__ = merge

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_models(self, models) -> list:
        owner = f"{type(self).__name__}.merge"
        if isinstance(models, (str, torch.nn.Module, dict, TaskVector)) or not hasattr(models, "__len__"):
            raise TypeError(f"The 'models' parameter of {owner} must be a list of fine-tuned models. Got {type(models).__name__}.")
        models = list(models)
        if len(models) < self.min_models or (self.max_models is not None and len(models) > self.max_models):
            accepted = f"{self.min_models}" + ("" if self.max_models == self.min_models else f"..{self.max_models or 'inf'}")
            raise ValueError(f"The 'models' parameter of {owner} needs {accepted} model(s). Got {len(models)}.")
        return models

    def _check_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None) -> tuple[list[TaskVector], list[float]]:
        owner = f"{type(self).__name__}.merge_vectors"
        vectors = list(vectors)
        if len(vectors) < self.min_models or (self.max_models is not None and len(vectors) > self.max_models):
            raise ValueError(f"{owner} got {len(vectors)} task vectors; it needs at least {self.min_models}" + (
                f" and at most {self.max_models}." if self.max_models is not None else "."))
        for i, v in enumerate(vectors):
            if not isinstance(v, TaskVector):
                raise TypeError(f"{owner} expects TaskVector objects. Got {type(v).__name__}.")
            check_finite(v, f"Task vector {i} given to {owner}")
        for v in vectors[1:]:
            vectors[0]._check_other(v)
        if weights is None:
            weights = [1.0] * len(vectors)
        if isinstance(weights, torch.Tensor) and weights.ndim == 1:
            weights = weights.tolist()
        if isinstance(weights, (str, bytes, torch.Tensor)) or not hasattr(weights, "__len__"):
            raise TypeError(
                f"The 'weights' parameter of {owner} must be None or a list of finite numbers, one per model "
                f"({len(vectors)}). Got {weights!r} instead."
            )
        weights = [check_float(w, f"weights[{i}]", owner) for i, w in enumerate(weights)]
        if len(weights) != len(vectors):
            raise ValueError(f"The 'weights' parameter of {owner} needs one weight per model ({len(vectors)}). Got {len(weights)}.")
        return vectors, weights

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"{type(self).__name__}({shown})"


def stack(vectors: Sequence[TaskVector], key: str) -> torch.Tensor:
    """The entries of one parameter across task vectors, ``[tasks, *shape]``."""
    return torch.stack([v[key] for v in vectors])


def weights_like(weights: Sequence[float], tensor: torch.Tensor) -> torch.Tensor:
    """Per-task weights shaped ``[tasks, 1, ..., 1]`` to broadcast against a stacked ``[tasks, *shape]`` tensor."""
    return torch.tensor(weights, dtype=tensor.dtype).reshape(-1, *([1] * (tensor.ndim - 1)))
