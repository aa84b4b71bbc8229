"""(IA)^3: learned vectors that rescale keys, values and the MLP's intermediate activation.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(arXiv 2205.05638), section 3.3::

    softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V)          l_k, l_v: (d_kv,)
    (l_ff * act(W_1 x)) W_2                            l_ff: (d_mlp,)

All vectors start at ones (the base model) and are the only trained parameters. As in PEFT, ``l_k``/``l_v``
scale the *output* of the key and value projections (bias included) and ``l_ff`` scales the *input* of the
MLP's down projection. Merging folds them into the weights::

    W_k' = diag(l_k) W_k,  b_k' = l_k * b_k          W_down' = W_down diag(l_ff)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..nn.view import ModelView, unwrap
from .base import Method
from .bitfit import out_features_of
from .lora import part_key, replace_module, write_dense
from .targets import resolve_targets, take_target_modules


def part_vector(parts: dict[str, slice], vectors: nn.ParameterDict, size: int, fill: float) -> torch.Tensor:
    """A ``(size,)`` vector holding ``vectors[key]`` on each part's rows and ``fill`` elsewhere."""
    order = sorted(parts, key=lambda k: parts[k].start)
    pieces, at = [], 0
    reference = vectors[order[0]]
    for key in order:
        s = parts[key]
        if s.start > at:
            pieces.append(reference.new_full((s.start - at,), fill))
        pieces.append(vectors[key])
        at = s.stop
    if at < size:
        pieces.append(reference.new_full((size - at,), fill))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (size,)


class IA3Layer(nn.Module):
    """Wraps an ``nn.Linear`` / ``Conv1D``: scales its output rows (per part) or its input features.

    ``ia3_l[key]`` is ``(rows,)`` for each output part (``"full"``, or ``"k"``/``"v"`` of a fused GPT-2
    ``c_attn``), or ``ia3_l["in"]`` of shape ``(in,)`` when ``feedforward`` (the input is scaled).
    """

    def __init__(self, base_layer: nn.Module, parts: dict[str, slice], feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        weight = base_layer.weight
        self.out_features = out_features_of(base_layer)
        self.in_features = weight.shape[0] if self.fan_in_fan_out else weight.shape[1]
        kwargs = {"dtype": torch.float32, "device": weight.device}
        if feedforward:
            self.parts = {"in": slice(0, self.in_features)}
        else:
            self.parts = dict(parts)
        self.ia3_l = nn.ParameterDict({k: nn.Parameter(torch.ones(s.stop - s.start, **kwargs)) for k, s in self.parts.items()})

    def scale(self) -> torch.Tensor:
        """The full scaling vector: ``(in,)`` if feedforward else ``(out,)``, ones outside the parts."""
        size = self.in_features if self.feedforward else self.out_features
        return part_vector(self.parts, self.ia3_l, size, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer(x * self.scale().to(x.dtype))
        result = self.base_layer(x)
        return result * self.scale().to(result.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Fold the vectors into the wrapped layer's weight (and bias) and return that layer."""
        w = self.base_layer.weight
        W = (w.T if self.fan_in_fan_out else w).float()  # (out, in)
        vec = self.scale().float()
        if self.feedforward:
            write_dense(self.base_layer, W * vec[None, :])
        else:
            write_dense(self.base_layer, W * vec[:, None])
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                bias.copy_((bias.float() * vec).to(bias.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, parts={list(self.parts)}"


@dataclass(repr=False)
class IA3(Method):
    """(IA)^3: train vectors ``l_k``, ``l_v`` (scaling keys and values) and ``l_ff`` (scaling the MLP activation).

    Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
    (arXiv 2205.05638): ``K -> l_k * K``, ``V -> l_v * V``, ``act(W_1 x) -> l_ff * act(W_1 x)``, all vectors
    initialised to ones, folded into ``W_k``, ``W_v`` and ``W_down`` by :meth:`merge`.

    Parameters
    ----------
    target : str or list of str, default=["attn.k", "attn.v", "mlp.down"]
        Matrices to rescale (canonical names, kinds, regular expressions or ``"all-linear"``); PEFT's default
        for Llama is the same set.
    feedforward : str or list of str, default="mlp.down"
        The targets whose *input* is scaled (the MLP activation for ``mlp.down``); the other targets have
        their output scaled. Must be a subset of ``target`` and whole layers (not a third of GPT-2's c_attn).
    target_modules, feedforward_modules : str or list of str, optional
        PEFT's names for ``target`` and ``feedforward`` (Hugging Face module names such as ``"k_proj"`` are
        accepted by both spellings).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> ia3 = fta.methods.IA3()
    >>> adapted = ia3.apply(model, copy=True)
    >>> sum(p.numel() for _, p in ia3.trainable_parameters(adapted))   # (64 + 64 + 256) per layer
    768
    """

    target: str | list[str] = field(default_factory=lambda: ["attn.k", "attn.v", "mlp.down"])
    feedforward: str | list[str] = "mlp.down"
    target_modules: str | list[str] | None = field(default=None, repr=False)
    feedforward_modules: str | list[str] | None = field(default=None, repr=False)
    targets_: list[str] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "ia3"
    paper: ClassVar[str] = "https://arxiv.org/abs/2205.05638"

    def __post_init__(self):
        take_target_modules(self, ["attn.k", "attn.v", "mlp.down"])
        if self.feedforward_modules is not None:  # PEFT's name for feedforward
            if self.feedforward not in ("mlp.down", self.feedforward_modules):
                raise ValueError(
                    f"IA3 got both feedforward={self.feedforward!r} and feedforward_modules={self.feedforward_modules!r}; "
                    "feedforward_modules is PEFT's name for feedforward: pass one of them."
                )
            self.feedforward, self.feedforward_modules = self.feedforward_modules, None
        for attr in ("target", "feedforward"):
            if isinstance(getattr(self, attr), (list, tuple)):
                setattr(self, attr, list(getattr(self, attr)))

    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        owner = type(self).__name__
        names = resolve_targets(view, self.target, owner=owner)
        ff_names = set(resolve_targets(view, self.feedforward, owner=owner)) if self.feedforward else set()
        outside = sorted(ff_names - set(names))
        if outside:
            raise ValueError(f"The 'feedforward' parameter of {owner} must select targets only; {outside[:3]} are not in 'target'.")
        by_module: dict[str, list[str]] = {}
        for name in names:
            by_module.setdefault(view.ref(name).module_path, []).append(name)
        plan = []
        for path, group in by_module.items():
            ff = [n for n in group if n in ff_names]
            if ff and (len(ff) != len(group) or view.ref(ff[0]).n_parts > 1):
                raise ValueError(
                    f"The 'feedforward' parameter of {owner} must name whole layers: {ff} share the fused module {path!r}, "
                    "whose input feeds q, k and v alike."
                )
            base = unwrap(model.get_submodule(path))
            parts = {part_key(view.ref(n).kind, view.ref(n).n_parts): view.ref(n).out_slice(out_features_of(base)) for n in group}
            plan.append((path, base, parts, bool(ff)))
        for p in model.parameters():
            p.requires_grad_(False)
        for path, base, parts, ff in plan:
            replace_module(model, path, IA3Layer(base, parts, ff))
        self.targets_ = names

    def _merge(self, model: nn.Module) -> None:
        wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer)]
        if not wrapped:
            raise ValueError(f"{type(self).__name__}.merge: the model carries no (IA)^3 layer (was apply called?).")
        for path, layer in wrapped:
            replace_module(model, path, layer.merge_into_base())

    def vectors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{canonical name: learned vector}`` (a copy): ``l_k``, ``l_v`` as ``(out,)``, ``l_ff`` as ``(in,)``."""
        view = ModelView(model)
        out = {}
        for name in view.matrix_names():
            layer = view.wrapper(name)
            if isinstance(layer, IA3Layer):
                ref = view.ref(name)
                key = "in" if layer.feedforward else part_key(ref.kind, ref.n_parts)
                if key in layer.ia3_l:
                    out[name] = layer.ia3_l[key].detach().clone()
        return out
