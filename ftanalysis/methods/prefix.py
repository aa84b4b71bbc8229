"""Prefix tuning: learned key and value vectors prepended to every attention layer.

Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (arXiv 2101.00190), in the
reading of He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (arXiv
2110.04366), section 3.1. Each head attends over ``l`` learned positions ``P_k, P_v`` (l x d_head) before the
sequence::

    head = Attn(x W_q, concat(P_k, C W_k), concat(P_v, C W_v))
         = (1 - lambda(x)) Attn(x W_q, C W_k, C W_v) + lambda(x) softmax(x W_q P_k^T) P_v

    lambda(x) = sum_i exp(x W_q P_k^T)_i / (sum_i exp(x W_q P_k^T)_i + sum_j exp(x W_q W_k^T C^T)_j)

(scaled dot products throughout): prefix tuning is a parallel adapter at attention whose output is gated by
the softmax mass ``lambda(x)`` that falls on the prefix. Prefix keys and values are free per layer and per
key/value head; they are not rotated (RoPE) nor position-embedded, as in PEFT's ``past_key_values`` form.

Implementation: the model's attention implementation is switched to ``"fta_prefix"``, a function registered
with Transformers' ``AttentionInterface`` that concatenates the prefix to the keys and values, opens the
attention mask on the prefix positions and calls Transformers' SDPA attention. Positions, padding and
causality of the real tokens are unchanged, so ``model(input_ids, attention_mask)`` works as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from .._validation import check_float, check_int
from ..nn.view import ModelView
from .base import APPLIED_ATTR, Method

PREFIX_IMPLEMENTATION = "fta_prefix"
PREFIX_ATTR = "_fta_prefix"  # (PrefixEncoder, layer) in the __dict__ of an attention module


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """Transformers attention function: SDPA over ``concat(prefix, keys)`` when ``module`` carries a prefix.

    ``query`` is ``[batch, heads, q_pos, d_head]``; ``key``/``value`` are ``[batch, kv_heads, kv_pos, d_head]``.
    Returns ``(attn_output [batch, q_pos, heads, d_head], None)`` like every Transformers attention function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    source = module.__dict__.get(PREFIX_ATTR)
    if source is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    encoder, layer = source
    prefix_k, prefix_v = encoder.layer_prefix(layer)  # [kv_heads, n_prefix, d_head] each
    batch, n_prefix = query.shape[0], prefix_k.shape[1]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    mask = prefix_mask(attention_mask, query.shape[2], key.shape[2], n_prefix, causal, query.device)
    key = torch.cat([prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)  # [batch, kv_heads, n_prefix + kv_pos, d_head]
    value = torch.cat([prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def prefix_mask(attention_mask, q_len: int, kv_len: int, n_prefix: int, causal: bool, device) -> torch.Tensor:
    """The attention mask over ``[prefix | keys]``: the prefix is visible to every query.

    ``attention_mask`` is Transformers' prepared mask (bool, True = attend; or additive float) of shape
    ``[batch or 1, 1 or heads, q_len, kv_len]``, or None (no padding: causal or full attention).
    """
    if attention_mask is None:
        if causal and q_len > 1:
            rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
            attention_mask = (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]  # [1, 1, q, kv]
        else:
            attention_mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if attention_mask.dtype == torch.bool:
        open_prefix = attention_mask.new_ones((*attention_mask.shape[:-1], n_prefix))
    else:
        open_prefix = attention_mask.new_zeros((*attention_mask.shape[:-1], n_prefix))
    return torch.cat([open_prefix, attention_mask], dim=-1)  # [batch or 1, 1 or heads, q, n_prefix + kv]


def register_prefix_attention() -> None:
    """Register ``"fta_prefix"`` with Transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PREFIX_IMPLEMENTATION, prefix_attention)
    AttentionMaskInterface.register(PREFIX_IMPLEMENTATION, sdpa_mask)


class PrefixEncoder(nn.Module):
    """Holds the prefixes of the prefixed layers (indexed 0..n-1): free ``(layers, kv_heads, l, d_head)`` tensors, or an MLP of l embeddings (Li & Liang).

    With ``hidden`` set, ``[P_k; P_v] = MLP(E)`` with ``E`` of shape ``(l, d_model)`` and a tanh MLP
    ``d_model -> hidden -> layers * 2 * kv_heads * d_head`` (Li & Liang's reparametrisation, which they found
    stabilises training).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, d_head: int, n_prefix: int, d_model: int, hidden: int | None, init_std: float, device=None):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.d_head, self.n_prefix = n_layers, n_kv_heads, d_head, n_prefix
        self.hidden = hidden
        if hidden is None:
            shape = (n_layers, n_kv_heads, n_prefix, d_head)
            self.prefix_keys = nn.Parameter(torch.randn(shape, device=device) * init_std)
            self.prefix_values = nn.Parameter(torch.randn(shape, device=device) * init_std)
        else:
            self.embedding = nn.Parameter(torch.randn(n_prefix, d_model, device=device) * init_std)
            self.mlp = nn.Sequential(
                nn.Linear(d_model, hidden, device=device), nn.Tanh(), nn.Linear(hidden, n_layers * 2 * n_kv_heads * d_head, device=device)
            )

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)``, each ``[layers, kv_heads, l, d_head]``."""
        if self.hidden is None:
            return self.prefix_keys, self.prefix_values
        out = self.mlp(self.embedding)  # [l, layers * 2 * kv_heads * d_head]
        both = rearrange(out, "p (two layer head d) -> two layer head p d", two=2, layer=self.n_layers, head=self.n_kv_heads)
        return both[0], both[1]

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_k, P_v)`` of one layer, ``[kv_heads, l, d_head]`` each."""
        if self.hidden is None:
            return self.prefix_keys[layer], self.prefix_values[layer]
        keys, values = self.prefixes()
        return keys[layer], values[layer]


def core_attention(view: ModelView, layer: int) -> nn.Module:
    """The module that calls the attention function in block ``layer`` (BERT: ``attention.self``)."""
    module = view.attention(layer)
    return module.self if view.family == "bert" else module


@dataclass(repr=False)
class PrefixTuning(Method):
    """Prefix tuning: ``l`` learned keys and values per layer and key/value head; the model stays frozen.

    Li and Liang 2021 (arXiv 2101.00190); the gated-adapter reading of He et al. 2022 (arXiv 2110.04366):
    ``(1 - lambda(x)) Attn(x W_q, C W_k, C W_v) + lambda(x) softmax(x W_q P_k^T) P_v``.

    Parameters
    ----------
    n_prefix : int, default=10
        Prefix length l (Li & Liang use 10 for table-to-text, 200 for summarisation).
    layers : list of int, optional
        Blocks that get a prefix (default: all).
    hidden : int, optional
        Width of Li & Liang's MLP reparametrisation (they use 512); None trains the prefixes directly (PEFT's
        default, ``prefix_projection=False``).
    init_std : float, default=1.0
        Standard deviation of the random initialisation (PEFT's ``nn.Embedding`` default is N(0, 1)).

    Notes
    -----
    Not the identity at initialisation: the prefix takes a share lambda(x) of every attention distribution
    (``identity_at_init = False``). No dense form: :meth:`merge` raises. Layers without a prefix run
    Transformers' SDPA attention, which matches its eager attention to float rounding. Composes with
    :class:`ftanalysis.methods.Adapter` (the MAM adapter of He et al.).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> prefix = fta.methods.PrefixTuning(n_prefix=4)
    >>> adapted = prefix.apply(model, copy=True)
    >>> sum(p.numel() for _, p in prefix.trainable_parameters(adapted))   # 2 layers x (k, v) x 4 heads x 4 x 16
    1024
    """

    n_prefix: int = 10
    layers: list[int] | None = None
    hidden: int | None = None
    init_std: float = 1.0
    layers_: list[int] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "prefix"
    paper: ClassVar[str] = "https://arxiv.org/abs/2101.00190"
    has_dense_form: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    composes_with: ClassVar[tuple[str, ...]] = ("adapter", "mezo")

    def __post_init__(self):
        owner = type(self).__name__
        check_int(self.n_prefix, "n_prefix", owner, 1)
        if self.hidden is not None:
            check_int(self.hidden, "hidden", owner, 1)
        check_float(self.init_std, "init_std", owner, low=0.0, low_open=True)
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise TypeError(f"The 'layers' parameter of {owner} must be a list of ints or None. Got {self.layers!r} instead.")
            self.layers = list(self.layers)

    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        if getattr(model, "fta_prefix", None) is not None:
            raise ValueError(f"{type(self).__name__}: this model already carries a prefix.")
        layers = list(range(view.n_layers)) if self.layers is None else sorted({view._layer(i) for i in self.layers})
        hf_model = model if hasattr(model, "set_attn_implementation") else next(
            (m for m in model.modules() if hasattr(m, "set_attn_implementation")), None
        )
        if hf_model is None:
            raise TypeError(f"{type(self).__name__} needs a Hugging Face model (set_attn_implementation) inside {type(model).__name__}.")
        if not getattr(model, APPLIED_ATTR, None):  # a composing method applied first already froze the base
            for p in model.parameters():
                p.requires_grad_(False)
        device = next(model.parameters()).device
        encoder = PrefixEncoder(
            len(layers), view.n_kv_heads, view.d_head, self.n_prefix, view.d_model, self.hidden, self.init_std, device=device
        )
        model.fta_prefix = encoder
        for index, layer in enumerate(layers):
            object.__setattr__(core_attention(view, layer), PREFIX_ATTR, (encoder, index))
        register_prefix_attention()
        hf_model.set_attn_implementation(PREFIX_IMPLEMENTATION)
        self.layers_ = layers

    def prefixes(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (P_k, P_v)}``, each ``[kv_heads, l, d_head]`` (detached copies)."""
        encoder = getattr(model, "fta_prefix", None)
        if encoder is None:
            raise ValueError(f"{type(self).__name__}.prefixes: the model carries no prefix (was apply called?).")
        with torch.no_grad():
            keys, values = encoder.prefixes()
            return {layer: (keys[i].clone(), values[i].clone()) for i, layer in enumerate(self.layers_)}
