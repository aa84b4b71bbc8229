"""The method contract: a small config object that makes a model trainable in its own way.

Every fine-tuning method is a dataclass of options (validated in ``__post_init__``) with

- ``apply(model, copy=False)``: make ``model`` trainable the method's way (in place unless ``copy=True``),
  adding modules if needed; returns the model.
- ``merge(model, copy=True)``: a plain model of the base architecture with dense weights (a ``ValueError``
  for methods that have no dense form).
- ``trainable_parameters(model)``: ``[(name, parameter), ...]`` that the optimiser updates.
- Optional training-loop hooks used by :func:`ftanalysis.finetune`: ``make_optimizer``, ``before_step``,
  ``training_step`` (a zeroth-order method replaces back-propagation here), ``after_step``, and
  ``state_dict`` / ``load_state_dict`` for resumable runs.
"""

from __future__ import annotations

import copy as copy_module
from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch
from torch import nn

from .._validation import check_bool

APPLIED_ATTR = "_fta_methods"


def applied_methods(model: nn.Module) -> list:
    """The methods applied to ``model`` and not merged yet, in order (``[]`` for a plain model)."""
    return list(getattr(model, APPLIED_ATTR, []))


def check_bool_fields(config) -> None:
    """``TypeError`` for a ``bool`` option holding anything else (``rslora="no"`` would otherwise count as True)."""
    for f in fields(config):
        if f.init and f.type in ("bool", bool):
            check_bool(getattr(config, f.name), f.name, type(config).__name__)


@dataclass
class Method:
    """Base class of the fine-tuning methods (see the module docstring for the contract)."""

    name: ClassVar[str] = "method"
    paper: ClassVar[str] = ""
    has_dense_form: ClassVar[bool] = True
    # other method names that may be applied to a model that already carries this one
    composes_with: ClassVar[tuple[str, ...]] = ()
    train_new_parameters: ClassVar[bool] = True
    # False for methods whose freshly applied model does not compute the base model (prefix tuning)
    identity_at_init: ClassVar[bool] = True

    # ------------------------------------------------------------------ apply / merge
    def apply(self, model: nn.Module, copy: bool = False) -> nn.Module:
        """Make ``model`` trainable with this method; **in place** unless ``copy=True``. Returns the model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}.apply expects a torch nn.Module. Got {type(model).__name__}.")
        check_bool(copy, "copy", f"{type(self).__name__}.apply")
        check_bool_fields(self)
        if copy:
            model = copy_module.deepcopy(model)
        applied = getattr(model, APPLIED_ATTR, [])
        for other in applied:
            if self.name not in other.composes_with and other.name not in self.composes_with:
                raise ValueError(
                    f"Cannot apply {type(self).__name__} to a model that already carries {type(other).__name__}: "
                    f"the two conflict. Merge the first one (method.merge(model)) before applying another."
                )
        self._apply(model)
        if self.train_new_parameters:
            for p in getattr(model, "new_parameters", lambda: [])():
                p.requires_grad_(True)  # a head the pretrained model did not have always trains (PEFT's modules_to_save)
        setattr(model, APPLIED_ATTR, [*applied, self])
        return model

    def _apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, copy: bool = True) -> nn.Module:
        """Fold the method's update into the base weights and return a plain model (a copy by default)."""
        if not self.has_dense_form:
            raise ValueError(
                f"{type(self).__name__} has no dense form: its update cannot be merged into the base weights."
            )
        if copy:
            model = copy_module.deepcopy(model)
        self._merge(model)
        if hasattr(model, APPLIED_ATTR):
            remaining = [m for m in getattr(model, APPLIED_ATTR) if type(m) is not type(self)]
            setattr(model, APPLIED_ATTR, remaining)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _merge(self, model: nn.Module) -> None:
        """Default: nothing to fold (the method trains the base weights directly)."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``[(name, parameter)]`` the optimiser updates (those with ``requires_grad``)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def trainable_count(self, model: nn.Module) -> int:
        """Number of trained entries (reported by ``finetune``); mask methods count only their masked entries."""
        return sum(p.numel() for _, p in self.trainable_parameters(model))

    # ------------------------------------------------------------------ training-loop hooks
    def prepare(self, model: nn.Module, tok, task, seed: int = 0) -> None:
        """Called by :func:`ftanalysis.finetune` right before :meth:`apply`, with the model that will be trained.

        Default: nothing. A method whose initialisation needs data (CorDA's calibration) reads it here.
        """

    def make_optimizer(
        self, model: nn.Module, lr: float, weight_decay: float = 0.0, fused: bool = False
    ) -> torch.optim.Optimizer | None:
        """AdamW over the trainable parameters (matrices decayed, vectors not); ``fused``: PyTorch's fused kernel."""
        params = self.trainable_parameters(model)
        if not params:
            raise ValueError(f"{type(self).__name__} left no trainable parameter in the model.")
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))

    def before_step(self, state) -> None:
        """Called before each step (e.g. to change which layers train)."""

    def training_step(self, state, batch: dict, compute_loss: Callable[[dict], torch.Tensor], grad_clip: float | None) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss. Default: back-propagation and the optimiser."""
        loss = compute_loss(batch)
        if not torch.isfinite(loss):
            return loss.detach()
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable_parameters(state.model)], grad_clip)
        self.after_backward(state)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def after_backward(self, state) -> None:
        """Called after gradients exist and before the optimiser step (e.g. to mask gradients)."""

    def after_step(self, state) -> None:
        """Called after each step."""

    def state_dict(self) -> dict:
        """Run-time state needed to resume training (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"{type(self).__name__}({shown})"
