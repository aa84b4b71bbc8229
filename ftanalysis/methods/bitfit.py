"""BitFit: fine-tune only the bias terms.

Ben Zaken, Ravfogel and Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models" (arXiv 2106.10199)::

    W x + b   ->   W x + (b + delta_b)            every W frozen, every b (and LayerNorm beta) trained

On BERT the paper trains every bias (query, key, value, attention output, intermediate, output and the
LayerNorm betas) plus the task head. Llama-family layers have no bias: by default BitFit adds a zero bias to
each targeted layer (the model still computes the base model at initialisation).

The bias helpers here (:func:`ensure_bias`, :func:`complete_biases`) are shared with SSF, whose shift folds
into a bias.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..nn.view import ModelView, is_conv1d, unwrap
from .base import Method
from .targets import resolve_targets


def out_features_of(layer: nn.Module) -> int:
    """Output size of an ``nn.Linear`` or GPT-2 ``Conv1D`` (weight ``(in, out)``)."""
    return layer.weight.shape[1] if is_conv1d(layer) else layer.weight.shape[0]


def ensure_bias(layer: nn.Module) -> nn.Parameter:
    """The layer's bias, after adding a zero one (float32-free: the weight's dtype and device) if it had none."""
    if getattr(layer, "bias", None) is None:
        weight = layer.weight
        layer.bias = nn.Parameter(torch.zeros(out_features_of(layer), dtype=weight.dtype, device=weight.device))
        layer._fta_added_bias = True
    return layer.bias


def complete_biases(model: nn.Module) -> None:
    """Make added biases part of the architecture, so that ``save_pretrained`` / ``from_pretrained`` keep them.

    Llama configs carry ``attention_bias`` and ``mlp_bias``: when any attention (MLP) projection of the model
    has a bias, the flag is set and the other projections of that kind get zero biases, which leaves the
    forward pass unchanged. Other families without such a flag (Qwen2's ``o_proj``, Mistral) keep the biases
    in memory only, with a warning.
    """
    view = ModelView(model)
    config = view.config
    for kind, flag in (("attn", "attention_bias"), ("mlp", "mlp_bias")):
        layers = {view.ref(n).module_path: view.module(n) for n in view.matrix_names(kind)}
        if not any(getattr(layer, "bias", None) is not None for layer in layers.values()):
            continue
        if hasattr(config, flag):
            if not getattr(config, flag):
                setattr(config, flag, True)
                for layer in layers.values():
                    ensure_bias(layer)
        else:
            missing = [path for path, layer in layers.items() if getattr(layer, "bias", None) is None]
            has_new = [path for path, layer in layers.items() if getattr(layer, "_fta_added_bias", False)]
            if missing and has_new:
                warnings.warn(
                    f"The merged {type(model).__name__} holds biases on {has_new[:2]}... that its config cannot "
                    "describe: the model computes the right outputs, but save_pretrained/from_pretrained would drop them.",
                    stacklevel=3,
                )


def grad_row_masks(model: nn.Module, names: list[str]) -> dict[int, torch.Tensor]:
    """``{id(bias): 0/1 mask}`` for fused GPT-2 biases of which only some parts (q, k, v) are targeted."""
    view = ModelView(model)
    covered: dict[str, list[slice]] = {}
    for name in names:
        ref = view.ref(name)
        if ref.n_parts > 1:
            layer = view.module(name)
            covered.setdefault(ref.module_path, []).append(ref.out_slice(out_features_of(layer)))
    masks = {}
    for path, slices in covered.items():
        layer = unwrap(model.get_submodule(path))
        if len(slices) < 3 and getattr(layer, "bias", None) is not None:
            mask = torch.zeros_like(layer.bias)
            for s in slices:
                mask[s] = 1
            masks[id(layer.bias)] = mask
    return masks


@dataclass(repr=False)
class BitFit(Method):
    """Train only biases: ``b -> b + delta_b`` on the targeted layers (and LayerNorm biases); weights frozen.

    Ben Zaken et al. 2022, "BitFit" (arXiv 2106.10199).

    Parameters
    ----------
    target : str or list of str, default="all-linear"
        Layers whose bias trains: canonical names, kinds (``"attn.q"``, ``"mlp"``), regular expressions or
        ``"all-linear"`` (see :func:`ftanalysis.methods.resolve_targets`). Targeting only ``attn.q`` of GPT-2's
        fused ``c_attn`` trains only the q third of its bias (the other gradients are masked).
    norms : bool, default=True
        Also train the bias (beta) of every LayerNorm, as in the paper. RMSNorm has none.
    add_missing : bool, default=True
        Give a zero bias to targeted layers that have none (Llama). False trains only existing biases and
        raises if there are none.

    Notes
    -----
    The merged model is the trained model itself; added biases are made part of a Llama architecture through
    its ``attention_bias`` / ``mlp_bias`` flags (:func:`complete_biases`).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> bitfit = fta.methods.BitFit()
    >>> adapted = bitfit.apply(model, copy=True)
    >>> sorted({n.split(".")[-1] for n, _ in bitfit.trainable_parameters(adapted)})
    ['bias']
    """

    target: str | list[str] = "all-linear"
    norms: bool = True
    add_missing: bool = True
    targets_: list[str] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "bitfit"
    paper: ClassVar[str] = "https://arxiv.org/abs/2106.10199"

    def __post_init__(self):
        for flag in ("norms", "add_missing"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"The {flag!r} parameter of {type(self).__name__} must be a bool. Got {getattr(self, flag)!r} instead.")
        if isinstance(self.target, (list, tuple)):
            self.target = list(self.target)

    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        names = resolve_targets(view, self.target, owner=type(self).__name__)
        layers = {view.ref(n).module_path: view.module(n) for n in names}
        if not self.add_missing and all(getattr(layer, "bias", None) is None for layer in layers.values()):
            raise ValueError(
                f"{type(self).__name__}(add_missing=False): none of the targeted layers has a bias "
                f"(a {view.family} model). Use add_missing=True to train zero-initialised biases."
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            if getattr(layer, "bias", None) is None:
                if not self.add_missing:
                    continue
                ensure_bias(layer)
            layer.bias.requires_grad_(True)
        if self.norms:
            for module in model.modules():
                if isinstance(module, nn.LayerNorm) and module.bias is not None:
                    module.bias.requires_grad_(True)
        self.targets_ = names

    def after_backward(self, state) -> None:
        """Zero the gradient of the untargeted thirds of a fused GPT-2 ``c_attn`` bias."""
        masks = self._masks(state.model)
        if not masks:
            return
        for _, p in self.trainable_parameters(state.model):
            mask = masks.get(id(p))
            if mask is not None and p.grad is not None:
                p.grad.mul_(mask.to(p.grad.device))

    def _masks(self, model: nn.Module) -> dict[int, torch.Tensor]:
        cache = getattr(self, "_mask_cache", None)
        if cache is None or cache[0]() is not model:
            cache = (weakref.ref(model), grad_row_masks(model, self.targets_))
            self._mask_cache = cache
        return cache[1]

    def _merge(self, model: nn.Module) -> None:
        complete_biases(model)
