"""DoRA: weight-decomposed low-rank adaptation (a trained magnitude times a LoRA-updated direction).

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353)::

    W' = m * (W0 + s B A) / ||W0 + s B A||_row          m: (out,), init ||W0||_row, B = 0 at init

Norms are taken per output row of the ``(out, in)`` matrix (the paper's column norm of the ``(in, out)``
weight; PEFT's ``dim=1`` of the ``(out, in)`` weight). Following section 4.3 of the paper (and PEFT), the norm
``||W0 + s B A||`` is treated as a constant in the backward pass: it is recomputed at every forward from the
current A and B but detached from the gradient graph. The forward pass is written as PEFT writes it::

    h = W0 x + b + (g - 1) * (W0 x) + g * s * B A x,       g = m / ||W0 + s B A||_row (detached)

so that it agrees with ``peft.LoraConfig(use_dora=True)`` to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.view import ModelView
from .lora import LoRA, LoRALayer, part_key


class DoRALayer(LoRALayer):
    """A :class:`LoRALayer` with a trainable magnitude per output row of every adapted part.

    ``lora_magnitude[key]`` has shape ``(rows,)``; rows of a fused GPT-2 ``c_attn`` that no part covers keep
    their base weight.
    """

    def __init__(self, base_layer: nn.Module, parts: dict[str, slice], r: int, scaling: float, dropout: float):
        super().__init__(base_layer, parts, r, scaling, dropout)
        device = base_layer.weight.device
        self.lora_magnitude = nn.ParameterDict(
            {k: nn.Parameter(torch.ones(s.stop - s.start, dtype=torch.float32, device=device)) for k, s in self.parts.items()}
        )

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ||W0 + s B A||_row`` for every part: the layer then computes exactly its LoRA forward."""
        for key in self.parts:
            self.lora_magnitude[key].copy_(self.weight_norm(key))

    def weight_norm(self, key: str) -> torch.Tensor:
        """``||W0[rows] + s B A||`` per output row, ``(rows,)``, detached (DoRA section 4.3)."""
        s = self.parts[key]
        with torch.no_grad():
            W = self.base_weight()[s].float() + self.delta_weight(key)  # (rows, in)
            return torch.linalg.vector_norm(W, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result if bias is None else result - bias  # W0 x, [..., out]
        else:
            base_out = F.linear(h.to(result.dtype), self.base_weight())  # W0 dropout(x), as PEFT does
        updates = {}
        for k in self._order:
            s = self.parts[k]
            g = self.lora_magnitude[k] / self.weight_norm(k)  # (rows,)
            updates[k] = (g - 1) * base_out[..., s.start : s.stop].float() + g * self.part_update(k, h)
        if self._full_cover:
            delta = updates[self._order[0]] if len(updates) == 1 else torch.cat([updates[k] for k in self._order], dim=-1)
        else:
            delta = result.new_zeros(result.shape, dtype=updates[self._order[0]].dtype)
            for k, u in updates.items():
                s = self.parts[k]
                delta[..., s.start : s.stop] = u
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``m * (W0 + s B A) / ||W0 + s B A||_row`` on the adapted rows, ``(out, in)`` float32."""
        w = self.base_weight().float().clone()
        for k, s in self.parts.items():
            direction = w[s] + self.delta_weight(k)  # (rows, in)
            w[s] = (self.lora_magnitude[k] / self.weight_norm(k))[:, None] * direction
        return w

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


@dataclass(repr=False)
class DoRA(LoRA):
    """Weight-decomposed LoRA: ``W' = m * (W0 + s B A) / ||W0 + s B A||_row``, with m, A and B trained.

    Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353). The magnitude ``m``
    starts at the row norms of the (initialised) ``W0 + s B A``, so with B = 0 the adapted model computes the
    base model exactly. The row norm is detached from the gradient (paper section 4.3, as in PEFT).

    Parameters
    ----------
    r, alpha, dropout, target, init, rslora, train_a
        As in :class:`ftanalysis.methods.LoRA` (defaults r=8, alpha=16, dropout=0, "all-linear",
        gaussian A and B = 0). ``train_a=False`` also freezes A here; m and B still train.

    Notes
    -----
    With dropout, the magnitude term uses ``W0 dropout(x)`` during training, as PEFT does, so a training-mode
    forward with dropout is not the merged model's forward (evaluation mode is).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> dora = fta.methods.DoRA(r=4, target="attn")
    >>> adapted = dora.apply(model, copy=True)
    >>> merged = dora.merge(adapted)   # a plain GPT2LMHeadModel
    """

    name: ClassVar[str] = "dora"
    paper: ClassVar[str] = "https://arxiv.org/abs/2402.09353"
    layer_cls: ClassVar[type[LoRALayer]] = DoRALayer

    def _apply(self, model: nn.Module) -> None:
        super()._apply(model)
        for layer in self.lora_layers(model).values():
            layer.lora_magnitude.requires_grad_(True)

    @torch.no_grad()
    def initialise(self, layer: LoRALayer, model: nn.Module, path: str) -> None:
        """LoRA's initialisation of A and B, then ``m = ||W0 + s B A||_row``."""
        super().initialise(layer, model, path)
        layer.reset_magnitude()

    def magnitudes(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{canonical name: m}`` (a copy), one ``(out,)`` vector per adapted matrix."""
        view = ModelView(model)
        out = {}
        for name in view.matrix_names():
            wrapper = view.wrapper(name)
            if isinstance(wrapper, DoRALayer):
                ref = view.ref(name)
                key = part_key(ref.kind, ref.n_parts)
                if key in wrapper.parts:
                    out[name] = wrapper.lora_magnitude[key].detach().clone()
        return out
