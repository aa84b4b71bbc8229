"""SSF: scale and shift the features after chosen operations, then fold into the preceding layer.

Lian et al. 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning"
(arXiv 2210.08823)::

    y = gamma * h + beta               h: the output of a linear layer or a norm; gamma = 1, beta = 0 at init

Only gamma and beta (and a new task head) train. Because the transform is affine and follows a linear
operation, it folds into it (re-parameterisation, paper section 3.2)::

    W' = diag(gamma) W,     b' = gamma * b + beta

and for a LayerNorm ``weight' = gamma * weight``, ``bias' = gamma * bias + beta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .._validation import check_float
from ..nn.view import ModelView, unwrap
from .base import Method
from .bitfit import complete_biases, ensure_bias, out_features_of
from .ia3 import part_vector
from .lora import part_key, replace_module, write_dense
from .targets import resolve_targets


def is_norm(module: nn.Module) -> bool:
    """True for LayerNorm and RMSNorm modules (``nn.LayerNorm``, ``LlamaRMSNorm``, ...)."""
    kind = type(module).__name__
    return isinstance(module, nn.LayerNorm) or kind.endswith("RMSNorm") or kind.endswith("LayerNorm")


class ScaleShiftLayer(nn.Module):
    """Wraps a linear layer or a norm: ``y = gamma * base(x) + beta`` on the rows of each part.

    ``ssf_scale[key]`` and ``ssf_shift[key]`` have shape ``(rows,)``; a norm has one part, ``"full"``. A norm
    without a bias (RMSNorm) gets no shift, since beta could not be folded into it.
    """

    def __init__(self, base_layer: nn.Module, parts: dict[str, slice], shift: bool):
        super().__init__()
        self.base_layer = base_layer
        self.parts = dict(parts)
        weight = base_layer.weight
        kwargs = {"dtype": torch.float32, "device": weight.device}
        self.size = weight.shape[0] if is_norm(base_layer) else out_features_of(base_layer)
        self.ssf_scale = nn.ParameterDict({k: nn.Parameter(torch.ones(s.stop - s.start, **kwargs)) for k, s in self.parts.items()})
        self.ssf_shift = (
            nn.ParameterDict({k: nn.Parameter(torch.zeros(s.stop - s.start, **kwargs)) for k, s in self.parts.items()})
            if shift
            else None
        )

    def gamma(self) -> torch.Tensor:
        return part_vector(self.parts, self.ssf_scale, self.size, 1.0)  # (size,)

    def beta(self) -> torch.Tensor | None:
        return None if self.ssf_shift is None else part_vector(self.parts, self.ssf_shift, self.size, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        y = h * self.gamma().to(h.dtype)
        beta = self.beta()
        return y if beta is None else y + beta.to(h.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Fold gamma and beta into the wrapped layer and return it."""
        layer = self.base_layer
        gamma, beta = self.gamma().float(), self.beta()
        if is_norm(layer):
            layer.weight.copy_((layer.weight.float() * gamma).to(layer.weight.dtype))
            if beta is not None:
                layer.bias.copy_((layer.bias.float() * gamma + beta.float()).to(layer.bias.dtype))
            return layer
        w = layer.weight
        W = (w.T if type(layer).__name__ == "Conv1D" else w).float()  # (out, in)
        write_dense(layer, W * gamma[:, None])
        bias = getattr(layer, "bias", None)
        if bias is None and beta is not None:
            bias = ensure_bias(layer)
        if bias is not None:
            new = bias.float() * gamma + (beta.float() if beta is not None else 0.0)
            bias.copy_(new.to(bias.dtype))
        return layer

    def extra_repr(self) -> str:
        return f"parts={list(self.parts)}, shift={self.ssf_shift is not None}"


@dataclass(repr=False)
class SSF(Method):
    """Scale-and-shift features: ``y = gamma * h + beta`` after the targeted layers and norms, folded at merge.

    Lian et al. 2022, "Scaling & Shifting Your Features" (arXiv 2210.08823): gamma = 1, beta = 0 at init;
    :meth:`merge` returns the base architecture with ``W' = diag(gamma) W``, ``b' = gamma * b + beta``.

    Parameters
    ----------
    target : str or list of str, default="all-linear"
        Linear layers followed by an SSF transform (canonical names, kinds, regular expressions, "all-linear").
        Targeting a third of GPT-2's fused ``c_attn`` scales only those output rows.
    norms : bool, default=True
        Also put an SSF transform after every LayerNorm / RMSNorm (the paper transforms the output of every
        operation, norms included). RMSNorm gets a scale only: it has no bias to fold a shift into.
    shift : bool, default=True
        Learn beta (False: scale only).
    init_scale : float, default=1.0
        Initial gamma; 1 starts at the base model (the paper draws gamma ~ N(1, 0.02) - set a different value
        only to study non-identity starts).

    Notes
    -----
    A linear layer without a bias (Llama) receives one when beta is folded; for Llama the config flags
    ``attention_bias`` / ``mlp_bias`` are set so the merged model saves and reloads with its biases.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> ssf = fta.methods.SSF()
    >>> merged = ssf.merge(ssf.apply(model, copy=True))   # same architecture, folded weights
    """

    target: str | list[str] = "all-linear"
    norms: bool = True
    shift: bool = True
    init_scale: float = 1.0
    targets_: list[str] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "ssf"
    paper: ClassVar[str] = "https://arxiv.org/abs/2210.08823"

    def __post_init__(self):
        owner = type(self).__name__
        for flag in ("norms", "shift"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"The {flag!r} parameter of {owner} must be a bool. Got {getattr(self, flag)!r} instead.")
        check_float(self.init_scale, "init_scale", owner)
        if isinstance(self.target, (list, tuple)):
            self.target = list(self.target)

    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        names = resolve_targets(view, self.target, owner=type(self).__name__) if self.target else []
        by_module: dict[str, dict[str, slice]] = {}
        for name in names:
            ref = view.ref(name)
            base = view.module(name)
            by_module.setdefault(ref.module_path, {})[part_key(ref.kind, ref.n_parts)] = ref.out_slice(out_features_of(base))
        norm_paths = [n for n, m in model.named_modules() if is_norm(m) and getattr(m, "weight", None) is not None] if self.norms else []
        if not by_module and not norm_paths:
            raise ValueError(f"{type(self).__name__} found nothing to transform: give a target or set norms=True.")
        for p in model.parameters():
            p.requires_grad_(False)
        for path, parts in by_module.items():
            base = unwrap(model.get_submodule(path))
            replace_module(model, path, self._layer(base, parts, self.shift))
        for path in norm_paths:
            base = model.get_submodule(path)
            has_bias = getattr(base, "bias", None) is not None
            replace_module(model, path, self._layer(base, {"full": slice(0, base.weight.shape[0])}, self.shift and has_bias))
        self.targets_ = names

    def _layer(self, base: nn.Module, parts: dict[str, slice], shift: bool) -> ScaleShiftLayer:
        layer = ScaleShiftLayer(base, parts, shift)
        if self.init_scale != 1.0:
            with torch.no_grad():
                for gamma in layer.ssf_scale.values():
                    gamma.fill_(self.init_scale)
        return layer

    def _merge(self, model: nn.Module) -> None:
        wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, ScaleShiftLayer)]
        if not wrapped:
            raise ValueError(f"{type(self).__name__}.merge: the model carries no SSF layer (was apply called?).")
        for path, layer in wrapped:
            replace_module(model, path, layer.merge_into_base())
        complete_biases(model)
