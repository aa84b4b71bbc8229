"""Bottleneck adapters, sequential or parallel, at the attention or the MLP sublayer.

He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (arXiv 2110.04366),
section 3: every method adds a modification ``delta_h`` to a sublayer's output ``h``::

    delta_h = s * relu(x W_down) W_up          W_down: (d, r), W_up: (r, d), W_up = 0 at init

- **sequential** (Houlsby et al. 2019): the adapter reads the sublayer's output, ``h <- h + s f(h W_down) W_up``;
- **parallel** (He et al.): it reads the sublayer's input, ``h <- h + s f(x W_down) W_up``;
- **position**: the attention sublayer (``h`` = output of the attention output projection, ``x`` = input of
  the q projection) or the MLP sublayer (``h`` = output of the down projection, ``x`` = input of the up
  projection), before the residual addition (and, in BERT, before the LayerNorm).

LoRA is the parallel form with no non-linearity placed at a weight matrix; prefix tuning is a gated parallel
form at attention (:mod:`ftanalysis.methods.prefix`). The "MAM adapter" of the paper is prefix tuning at
attention plus a parallel adapter with s = 4 at the MLP: ``Adapter(position="mlp", scaling=4)`` applied after
``PrefixTuning`` (the two compose).

Adapters add a non-linear function, so they have no dense form: :meth:`Adapter.merge` raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .._validation import check_float, check_int, check_option
from ..nn.view import ModelView, unwrap
from .base import APPLIED_ATTR, Method
from .bitfit import out_features_of
from .lora import replace_module

ADAPTER_MODES = ("sequential", "parallel")
ADAPTER_POSITIONS = ("attn", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}
# (sublayer input, sublayer output) canonical kinds for each position
_SITES = {"attn": ("attn.q", "attn.o"), "mlp": ("mlp.up", "mlp.down")}


class _Slot:
    """A plain holder shared by an :class:`InputTap` and its :class:`AdapterLayer` (not a module)."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None


class InputTap(nn.Module):
    """Wraps the layer that reads a sublayer's input and keeps that input for a parallel adapter."""

    def __init__(self, base_layer: nn.Module, slot: _Slot):
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.slot.value = x
        return self.base_layer(x)


class Bottleneck(nn.Module):
    """``s * f(x W_down + b_down) W_up + b_up`` with ``W_up = 0``, ``b_up = 0`` at init."""

    def __init__(self, d_in: int, r: int, d_out: int, activation: str, scaling: float, device=None):
        super().__init__()
        self.adapter_down = nn.Linear(d_in, r, device=device)  # PyTorch's default (Kaiming-uniform) init
        self.act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(r, d_out, device=device)
        self.scaling = scaling
        with torch.no_grad():
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.adapter_down.weight.dtype
        return self.adapter_up(self.act(self.adapter_down(x.to(dtype)))) * self.scaling

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class AdapterLayer(nn.Module):
    """Wraps a sublayer's output projection: ``h + adapter(h)`` (sequential) or ``h + adapter(x)`` (parallel)."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, mode: str, slot: _Slot | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.mode = mode
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.mode == "sequential":
            source = h
        else:
            source, self.slot.value = self.slot.value, None
            if source is None:
                raise RuntimeError(
                    "A parallel adapter found no sublayer input: the sublayer's input projection did not run before its "
                    "output projection in this forward pass."
                )
        return h + self.adapter(source).to(h.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


@dataclass(repr=False)
class Adapter(Method):
    """Bottleneck adapters in He et al.'s unified view: ``h <- h + s * relu(z W_down) W_up``, z = h or x.

    He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (arXiv 2110.04366);
    sequential adapters from Houlsby et al. 2019 (arXiv 1902.00751). ``W_up`` starts at 0, so the adapted
    model computes the base model at initialisation; only the adapters (and a new task head) train.

    Parameters
    ----------
    r : int, default=16
        Bottleneck width, in [1, d_model].
    position : {"attn", "mlp"} or list of them, default="mlp"
        Sublayer(s) to adapt. He et al. find the MLP the better place for a large budget.
    mode : {"parallel", "sequential"}, default="parallel"
        Read the sublayer's input (parallel) or its output (sequential, Houlsby).
    scaling : float, default=1.0
        The scale s. He et al. use s = 4 for the parallel MLP adapter of the MAM adapter.
    activation : {"relu", "gelu", "tanh", "identity"}, default="relu"
        The non-linearity f.
    layers : list of int, optional
        Blocks to adapt (default: all).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> adapter = fta.methods.Adapter(r=8, position=["attn", "mlp"], mode="parallel")
    >>> adapted = adapter.apply(model, copy=True)
    >>> sum(p.numel() for _, p in adapter.trainable_parameters(adapted))   # 2 layers x 2 sites x (64*8+8 + 8*64+64)
    4384
    """

    r: int = 16
    position: str | list[str] = "mlp"
    mode: str = "parallel"
    scaling: float = 1.0
    activation: str = "relu"
    layers: list[int] | None = None
    sites_: list[str] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "adapter"
    paper: ClassVar[str] = "https://arxiv.org/abs/2110.04366"
    has_dense_form: ClassVar[bool] = False
    composes_with: ClassVar[tuple[str, ...]] = ("prefix", "mezo")

    def __post_init__(self):
        owner = type(self).__name__
        check_int(self.r, "r", owner, 1)
        positions = [self.position] if isinstance(self.position, str) else list(self.position)
        if not positions:
            raise ValueError(f"The 'position' parameter of {owner} must name at least one of {list(ADAPTER_POSITIONS)}.")
        for p in positions:
            check_option(p, "position", owner, ADAPTER_POSITIONS)
        self.position = positions[0] if len(positions) == 1 else list(dict.fromkeys(positions))
        check_option(self.mode, "mode", owner, ADAPTER_MODES)
        check_float(self.scaling, "scaling", owner)
        if self.scaling == 0:
            raise ValueError(f"The 'scaling' parameter of {owner} must be non-zero. Got 0.0 instead.")
        check_option(self.activation, "activation", owner, list(ACTIVATIONS))
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise TypeError(f"The 'layers' parameter of {owner} must be a list of ints or None. Got {self.layers!r} instead.")
            self.layers = list(self.layers)

    @property
    def positions(self) -> list[str]:
        return [self.position] if isinstance(self.position, str) else list(self.position)

    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        owner = type(self).__name__
        layers = range(view.n_layers) if self.layers is None else [view._layer(i) for i in self.layers]
        plan = []
        for layer in layers:
            for position in self.positions:
                src, dst = (f"layers.{layer}.{kind}" for kind in _SITES[position])
                if dst not in view.matrix_names():
                    raise ValueError(f"{owner}: no {position} sublayer output {dst!r} in this {view.family} model.")
                out_layer = view.module(dst)
                d = out_features_of(out_layer)
                if self.r > d:
                    raise ValueError(f"The 'r' parameter of {owner} must be <= d_model = {d}. Got {self.r}.")
                for name in (src, dst):
                    if view.wrapper(name) is not view.module(name):
                        raise ValueError(
                            f"{owner}: {view.ref(name).module_path!r} is already wrapped by "
                            f"{type(view.wrapper(name)).__name__}; merge that method first."
                        )
                plan.append((f"layers.{layer}.{position}", view.ref(src).module_path, view.ref(dst).module_path, d))
        if not getattr(model, APPLIED_ATTR, None):  # a composing method applied first already froze the base
            for p in model.parameters():
                p.requires_grad_(False)
        for _site, src_path, dst_path, d in plan:
            base_out = unwrap(model.get_submodule(dst_path))
            adapter = Bottleneck(d, self.r, d, self.activation, self.scaling, device=base_out.weight.device)
            slot = None
            if self.mode == "parallel":
                slot = _Slot()
                replace_module(model, src_path, InputTap(unwrap(model.get_submodule(src_path)), slot))
            replace_module(model, dst_path, AdapterLayer(base_out, adapter, self.mode, slot))
        self.sites_ = [site for site, *_ in plan]

    def adapters(self, model: nn.Module) -> dict[str, Bottleneck]:
        """``{module path of the output projection: Bottleneck}``."""
        return {n: m.adapter for n, m in model.named_modules() if isinstance(m, AdapterLayer)}

    def parameter_budget(self, model: nn.Module) -> float:
        """Trainable adapter parameters as a fraction of the model's parameters."""
        n = sum(p.numel() for a in self.adapters(model).values() for p in a.parameters())
        total = sum(p.numel() for p in model.parameters()) - n
        return n / max(1, total)

