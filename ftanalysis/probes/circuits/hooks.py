"""Read and overwrite the activations of plain Hugging Face decoders, under TransformerLens' names.

No conversion: the hooks sit on the modules of the model as Hugging Face builds it (GPT-2 and the Llama
family: Llama, Qwen2, Mistral), found through :class:`ftanalysis.nn.ModelView`. Names use the package's
``layers.{l}.`` prefix with TransformerLens' suffixes:

===================================== ================================= ======================================
name                                  shape                             where it is read
===================================== ================================= ======================================
``hook_embed``                        ``[batch, pos, d_model]``         output of the token embedding
                                                                        (GPT-2 ``wte``, Llama ``embed_tokens``)
``hook_pos_embed``                    ``[batch, pos, d_model]``         output of GPT-2's learned position
                                                                        embedding ``wpe``, repeated over the
                                                                        batch (RoPE models have none)
``layers.{l}.hook_resid_pre``         ``[batch, pos, d_model]``         input of block ``l``
``layers.{l}.hook_resid_mid``         ``[batch, pos, d_model]``         input of the block's second norm
``layers.{l}.hook_resid_post``        ``[batch, pos, d_model]``         output of block ``l``
``layers.{l}.hook_attn_out``          ``[batch, pos, d_model]``         output of the attention module
``layers.{l}.hook_mlp_out``           ``[batch, pos, d_model]``         output of the MLP
``layers.{l}.attn.hook_q``            ``[batch, pos, head, d_head]``    query projection (before RoPE)
``layers.{l}.attn.hook_k``            ``[batch, pos, kv_head, d_head]`` key projection (before RoPE)
``layers.{l}.attn.hook_v``            ``[batch, pos, kv_head, d_head]`` value projection
``layers.{l}.attn.hook_z``            ``[batch, pos, head, d_head]``    input of the output projection
``layers.{l}.attn.hook_result``       ``[batch, pos, head, d_model]``   each head's output: its ``z`` times its
                                                                        ``d_head`` columns of ``W_O``; the sum
                                                                        over heads plus the output bias is
                                                                        ``hook_attn_out``
``layers.{l}.attn.hook_attn_scores``  ``[batch, head, q_pos, k_pos]``   scaled scores before the softmax;
                                                                        masked entries hold the dtype's most
                                                                        negative value (TransformerLens: -inf)
``layers.{l}.attn.hook_pattern``      ``[batch, head, q_pos, k_pos]``   softmax of the attention scores
``layers.{l}.mlp.hook_post``          ``[batch, pos, d_mlp]``           neuron activations: the input of the
                                                                        MLP's down projection (``act(gate) *
                                                                        up`` in Llama)
``ln_final.hook_scale``               ``[batch, pos, 1]``               what the final norm divides by, float32:
                                                                        ``sqrt(var(x) + eps)`` (LayerNorm),
                                                                        ``sqrt(mean(x^2) + eps)`` (RMSNorm)
``ln_final.hook_normalized``          ``[batch, pos, d_model]``         output of the final norm (weight and
                                                                        bias applied): what ``lm_head`` reads
===================================== ================================= ======================================

The four names without a layer are *global* (one per model), spelled as in TransformerLens. A cache takes
TransformerLens' short names for them, ``cache["embed"]``, ``cache["pos_embed"]``, ``cache["scale"]`` and
``cache["normalized"]``, and ``cache[short, layer]`` for the others (``cache["result", 3]``). Every hook is
writable: a returned tensor replaces the activation. A new ``hook_scale`` makes the final norm compute
``C(x) / scale * weight + bias`` with it (``C`` centres for LayerNorm; no centring nor bias for RMSNorm); a new
``hook_result`` makes the attention output the sum over heads of the returned results plus the output bias.
``hook_result`` is computed only when selected (it is ``n_heads`` times the size of the attention output) and
reads the output projection's own weight, so an adapter wrapped around that projection is refused (merge it
first). ``hook_embed`` is read when the model embeds ``input_ids`` itself (a call with ``inputs_embeds`` skips
it), and on GPT-2 it refuses ``token_type_ids``, which GPT-2 embeds with the same module. TransformerLens puts
an RMSNorm's ``hook_normalized`` before the norm's weight; here it is always the norm's output, so that
``lm_head(hook_normalized)`` are the logits in both families.

``hook_z`` is TransformerLens' ``hook_z``: the per-head mix of values, i.e. the input of ``o_proj`` (GPT-2's
``attn.c_proj``) split into heads with ``einops``. Hugging Face's default ``sdpa`` attention never forms the
pattern, so while a pattern or score hook is active the model runs a registered eager attention function
(``"ftanalysis_hooked"``) that computes it, passes it through the hooks and uses what they return; the
model's attention implementation is restored on exit.

Every hook lives inside :func:`hooks`, a context manager that removes all of them (and restores the
attention implementation) in ``finally``, also when the forward pass raises.

Examples
--------
>>> import torch, ftanalysis as fta
>>> from ftanalysis.probes.circuits import run_with_cache
>>> model, tok = fta.zoo.load("gpt2-tiny")
>>> ids = torch.tensor([tok("box F contains the")["input_ids"]])
>>> logits, cache = run_with_cache(model, ids, names_filter=["layers.0.attn.hook_z", "layers.1.attn.hook_pattern"])
>>> tuple(cache["z", 0].shape), tuple(cache["pattern", 1].shape)
((1, 5, 4, 16), (1, 4, 5, 5))
>>> names = ["hook_embed", "layers.1.attn.hook_result", "ln_final.hook_scale"]
>>> _, cache = run_with_cache(model, ids, names_filter=names)
>>> tuple(cache["embed"].shape), tuple(cache["result", 1].shape), tuple(cache["scale"].shape)
((1, 5, 64), (1, 5, 4, 64), (1, 5, 1))
"""

from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import einops
import torch
from torch import nn

from ...nn.view import ModelView, final_norm, norm_parameters, norm_scale, unwrap

# suffix -> shape of the activation, as a string of axis names
SUFFIXES: dict[str, str] = {
    "hook_resid_pre": "batch pos d_model",
    "hook_resid_mid": "batch pos d_model",
    "hook_resid_post": "batch pos d_model",
    "hook_attn_out": "batch pos d_model",
    "hook_mlp_out": "batch pos d_model",
    "attn.hook_q": "batch pos head d_head",
    "attn.hook_k": "batch pos kv_head d_head",
    "attn.hook_v": "batch pos kv_head d_head",
    "attn.hook_z": "batch pos head d_head",
    "attn.hook_result": "batch pos head d_model",
    "attn.hook_attn_scores": "batch head q_pos k_pos",
    "attn.hook_pattern": "batch head q_pos k_pos",
    "mlp.hook_post": "batch pos d_mlp",
}
# global hooks (one per model, no layer), named as in TransformerLens -> shape
GLOBALS: dict[str, str] = {
    "hook_embed": "batch pos d_model",
    "hook_pos_embed": "batch pos d_model",  # GPT-2 only: RoPE models have no position embedding
    "ln_final.hook_scale": "batch pos 1",
    "ln_final.hook_normalized": "batch pos d_model",
}
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed")
# short names accepted by ``cache[short, layer]`` and by the patching functions' ``component``
SHORT_NAMES: dict[str, str] = {s.split("hook_")[-1]: s for s in SUFFIXES}
# short names of the global hooks, accepted by ``cache[short]`` (TransformerLens' ``get_act_name`` spelling)
GLOBAL_SHORT_NAMES: dict[str, str] = {g.split("hook_")[-1]: g for g in GLOBALS}
HOOKED_FAMILIES = ("gpt2", "llama")
ATTENTION_IMPLEMENTATION = "ftanalysis_hooked"
_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
# TransformerLens names its blocks "blocks.{l}"; its per-layer hook names are otherwise the same as ours
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
# TransformerLens hooks without a counterpart here (named in the error, so a user knows it is not a typo)
TL_ONLY_SUFFIXES = (
    "hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_rot_q", "attn.hook_rot_k", "mlp.hook_pre",
    "mlp.hook_pre_linear", "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
)
TL_ONLY_GLOBAL = ("hook_tokens",)
# the second norm of a block, whose input is hook_resid_mid
_SECOND_NORM = {"gpt2": "ln_2", "llama": "post_attention_layernorm"}

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


@dataclass(frozen=True)
class HookPoint:
    """A named activation of one layer, or a global one (what a hook function receives as its second argument)."""

    name: str  # e.g. "layers.1.attn.hook_z", or a global name such as "hook_embed"
    layer: int | None  # None for the global hooks
    suffix: str  # e.g. "attn.hook_z"; the name itself for global hooks

    @property
    def shape(self) -> str:
        """The activation's axes, e.g. ``"batch pos head d_head"``."""
        return GLOBALS[self.suffix] if self.layer is None else SUFFIXES[self.suffix]

    @property
    def short(self) -> str:
        """The short name (``"z"``, ``"resid_pre"``, ...)."""
        return self.suffix.split("hook_")[-1]


def act_name(component: str, layer: int | None = None) -> str:
    """Full hook name of a short component name: ``act_name("z", 3) == "layers.3.attn.hook_z"``.

    Global components take no layer: ``act_name("embed") == "hook_embed"``, ``act_name("scale") ==
    "ln_final.hook_scale"``.
    """
    if component in GLOBALS or component in GLOBAL_SHORT_NAMES:
        if layer is not None:
            raise ValueError(
                f"Component {component!r} is global (one per model) and takes no layer. Got layer {layer!r}."
            )
        return GLOBAL_SHORT_NAMES.get(component, component)
    if component not in SUFFIXES and component not in SHORT_NAMES:
        raise ValueError(
            f"Unknown component {component!r}. Known components: {list(SHORT_NAMES)} (with a layer) and "
            f"{list(GLOBAL_SHORT_NAMES)} (global)."
        )
    if layer is None:
        raise ValueError(f"Component {component!r} belongs to a layer: give one, e.g. act_name({component!r}, 0).")
    return f"layers.{layer}.{SHORT_NAMES.get(component, component)}"


def _globals_of(view: ModelView) -> list[str]:
    return [g for g in GLOBALS if g != "hook_pos_embed" or view.decoder_module("pos_embed") is not None]


def hook_names(model_or_view) -> list[str]:
    """Every hook name of a model in the order of the forward pass: embeddings, layers, final norm."""
    view = _view(model_or_view)
    present = _globals_of(view)
    return (
        [g for g in present if g in _BEFORE_BLOCKS]
        + [f"layers.{layer}.{suffix}" for layer in range(view.n_layers) for suffix in SUFFIXES]
        + [g for g in present if g not in _BEFORE_BLOCKS]
    )


def canonical_name(name: str) -> str:
    """Our name for a TransformerLens-style hook name: ``"blocks.3.attn.hook_z"`` -> ``"layers.3.attn.hook_z"``."""
    match = _TL_NAME.match(name) if isinstance(name, str) else None
    return f"layers.{match.group(1)}.{match.group(2)}" if match else name


def parse_name(name: str, view: ModelView) -> HookPoint:
    """The :class:`HookPoint` of a full hook name (``ValueError`` naming what exists otherwise).

    TransformerLens' ``blocks.{l}.`` prefix is accepted as an alias of ``layers.{l}.``; the point's ``name`` is
    always ours, so caches are keyed by it (and :class:`ActivationCache` accepts either spelling). The global
    names (``hook_embed``, ``hook_pos_embed``, ``ln_final.hook_scale``, ``ln_final.hook_normalized``) are the same
    in both schemes.
    """
    if not isinstance(name, str):
        raise TypeError(f"Hook names must be str. Got {type(name).__name__} ({name!r}).")
    name = canonical_name(name)
    known = (
        f"Names are 'layers.{{l}}.<suffix>' (or TransformerLens' 'blocks.{{l}}.<suffix>') with suffix one of "
        f"{list(SUFFIXES)}, or one of the global names {list(GLOBALS)}."
    )
    if name in GLOBALS:
        if name == "hook_pos_embed" and view.decoder_module("pos_embed") is None:
            raise ValueError(
                f"'hook_pos_embed' does not exist in this {view.config.model_type} model: RoPE models have no position "
                "embedding (positions enter by rotating q and k inside attention; attn.hook_q and attn.hook_k are read "
                "before the rotation)."
            )
        return HookPoint(name=name, layer=None, suffix=name)
    match = _NAME.match(name)
    if match is None or match.group(2) not in SUFFIXES:
        bare = match.group(2) if match else name
        if match is not None and bare in GLOBALS:
            raise ValueError(
                f"{bare!r} is a global hook (one per model): name it {bare!r}, without the layer prefix of {name!r}."
            )
        if bare in TL_ONLY_SUFFIXES or bare in TL_ONLY_GLOBAL:
            raise ValueError(f"{name!r} is a TransformerLens hook that this package does not provide. {known}")
        raise ValueError(f"Unknown hook name {name!r}. {known}")
    layer = int(match.group(1))
    if layer >= view.n_layers:
        raise ValueError(f"Hook name {name!r} has layer {layer}, out of range for a model with {view.n_layers} layers.")
    return HookPoint(name=name, layer=layer, suffix=match.group(2))


def resolve_names(names_filter, view: ModelView) -> list[HookPoint]:
    """Hook points selected by ``names_filter``: a name, a list of names, or a predicate on names."""
    if names_filter is None:
        return []
    if callable(names_filter) and not isinstance(names_filter, str):
        return [parse_name(n, view) for n in hook_names(view) if names_filter(n)]
    names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    return [parse_name(n, view) for n in names]


def _view(model_or_view) -> ModelView:
    view = model_or_view if isinstance(model_or_view, ModelView) else ModelView(model_or_view)
    if view.family not in HOOKED_FAMILIES:
        raise ValueError(
            f"Activation hooks support the decoder families {list(HOOKED_FAMILIES)} (GPT-2, Llama, Qwen2, Mistral). "
            f"Got a {view.family!r} model."
        )
    return view


# ---------------------------------------------------------------------------------------------------------------
# The one place that unwraps Hugging Face's tuple outputs and keyword inputs.
def first_tensor(output) -> torch.Tensor:
    """The hidden states of a module output that may be a tensor, a tuple or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find hidden states in a module output of type {type(output).__name__}.")


def replace_first(output, value: torch.Tensor):
    """``output`` with its hidden states replaced by ``value`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return value
    return type(output)((value, *output[1:])) if isinstance(output, tuple) else [value, *output[1:]]


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states input of a module called either positionally or with ``hidden_states=``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError(f"Cannot find the hidden-states input among keyword arguments {sorted(kwargs)}.")


def _with_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


# ---------------------------------------------------------------------------------------------------------------
# Attention patterns: an eager attention function that exposes the pattern to hooks.
_PATTERN_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list[Callable]]" = weakref.WeakKeyDictionary()
_SCORE_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list[Callable]]" = weakref.WeakKeyDictionary()


def _hooked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (``softmax(q k^T * scaling + mask) v``) whose pattern passes through the active hooks."""
    # query [batch, head, q_pos, d_head]; key, value [batch, kv_head, k_pos, d_head]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: query head i reads kv head i // groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [batch, head, q_pos, k_pos]
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif getattr(module, "is_causal", True) and query.shape[-2] > 1:
        q_len, k_len = query.shape[-2], key.shape[-2]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, float("-inf"))
    for hook in _SCORE_HOOKS.get(module, ()):
        scores = hook(scores)
    pattern = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # [batch, head, q_pos, k_pos]
    for hook in _PATTERN_HOOKS.get(module, ()):
        pattern = hook(pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()  # [batch, q_pos, head, d_head]
    return out, pattern


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if ATTENTION_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, _hooked_attention)
    if ATTENTION_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


# ---------------------------------------------------------------------------------------------------------------
class _Installer:
    """Registers torch hooks for hook points and remembers how to remove them."""

    def __init__(self, view: ModelView):
        self.view = view
        self.handles: list = []
        self.pattern_entries: list[tuple[weakref.WeakKeyDictionary, nn.Module, Callable]] = []
        self.scale_fns: list[Callable] | None = None  # the ln_final.hook_scale functions, in order, once installed
        # GPT-2 only: {"size": batch size of the running forward pass, "embed": whether hook_embed is active}
        self.batch: dict | None = None

    def add(self, point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Install ``fn(canonical activation) -> replacement or None`` at ``point``."""
        if point.layer is None:
            self._add_global(point, fn)
            return
        view, family, layer, suffix = self.view, self.view.family, point.layer, point.suffix
        block = view.block(layer)
        attn = view.attention(layer)

        def checked(value: torch.Tensor, new) -> torch.Tensor | None:
            return _checked(point, value, new)

        if suffix == "attn.hook_result":
            self._add_result(point, fn)
            return
        if suffix in ("hook_resid_pre", "hook_resid_mid", "attn.hook_z", "mlp.hook_post"):
            module = {
                "hook_resid_pre": block,
                "hook_resid_mid": block.get_submodule(_SECOND_NORM[family]) if family in _SECOND_NORM else None,
                "attn.hook_z": view.wrapper(f"layers.{layer}.attn.o"),
                "mlp.hook_post": view.wrapper(f"layers.{layer}.mlp.down"),
            }[suffix]
            heads = suffix == "attn.hook_z"

            def pre_hook(_module, args, kwargs):
                raw = _input_tensor(args, kwargs)
                value = einops.rearrange(raw, "b p (h d) -> b p h d", d=view.d_head) if heads else raw
                new = checked(value, fn(value))
                if new is None:
                    return None
                new = einops.rearrange(new, "b p h d -> b p (h d)") if heads else new
                return _with_input(args, kwargs, new)

            self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        elif suffix in ("hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            module = {"hook_resid_post": block, "hook_attn_out": attn, "hook_mlp_out": block.get_submodule("mlp")}[suffix]

            def post_hook(_module, _args, output):
                value = first_tensor(output)
                new = checked(value, fn(value))
                return None if new is None else replace_first(output, new)

            self.handles.append(module.register_forward_hook(post_hook))
        elif suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
            ref = view.ref(f"layers.{layer}.attn.{suffix[-1]}")
            module = view.wrapper(ref.name)

            def qkv_hook(_module, _args, output):
                rows = ref.out_slice(output.shape[-1])  # q, k or v third of GPT-2's fused c_attn
                value = einops.rearrange(output[..., rows], "b p (h d) -> b p h d", d=view.d_head)
                new = checked(value, fn(value))
                if new is None:
                    return None
                flat = einops.rearrange(new, "b p h d -> b p (h d)")
                if ref.part is None:
                    return flat
                return torch.cat([output[..., : rows.start], flat, output[..., rows.stop :]], dim=-1)

            self.handles.append(module.register_forward_hook(qkv_hook))
        elif suffix in ("attn.hook_pattern", "attn.hook_attn_scores"):

            def pattern_hook(pattern: torch.Tensor) -> torch.Tensor:
                new = checked(pattern, fn(pattern))
                return pattern if new is None else new

            registry = _PATTERN_HOOKS if suffix == "attn.hook_pattern" else _SCORE_HOOKS
            registry.setdefault(attn, []).append(pattern_hook)
            self.pattern_entries.append((registry, attn, pattern_hook))
        else:  # pragma: no cover - SUFFIXES and this function are kept in step
            raise AssertionError(suffix)

    def _add_result(self, point: HookPoint, fn: Callable) -> None:
        """``attn.hook_result``: each head's ``z`` through its columns of ``W_O`` (read at the output projection)."""
        view = self.view
        ref = view.ref(f"layers.{point.layer}.attn.o")
        module = view.wrapper(ref.name)
        if module is not view.module(ref.name):
            raise ValueError(
                f"{point.name!r} splits the output projection of layer {point.layer} by head through its weight, but "
                f"it is wrapped by an adapter ({type(module).__name__}): merge the adapter first "
                "(e.g. result.merged_model())."
            )

        def result_hook(_module, args, kwargs, output):
            z = einops.rearrange(
                _input_tensor(args, kwargs), "b p (head d_head) -> b p head d_head", d_head=view.d_head
            )  # [batch, pos, head, d_head]
            weight = module.weight if ref.transposed else module.weight.T  # Conv1D stores (in, out); Linear (out, in)
            w_o = einops.rearrange(weight, "(head d_head) d_model -> head d_head d_model", d_head=view.d_head)
            result = einops.einsum(z, w_o, "b p head d_head, head d_head d_model -> b p head d_model")  # per head
            new = _checked(point, result, fn(result))
            if new is None:
                return None
            out = einops.reduce(new, "b p head d_model -> b p d_model", "sum")
            bias = getattr(module, "bias", None)
            return (out if bias is None else out + bias).to(output.dtype)

        self.handles.append(module.register_forward_hook(result_hook, with_kwargs=True))

    def _add_global(self, point: HookPoint, fn: Callable) -> None:
        view, name = self.view, point.name
        if name in ("hook_embed", "hook_pos_embed"):
            if view.family == "gpt2":
                self._watch_decoder_input(embed=name == "hook_embed")
            module = view.decoder_module("embed" if name == "hook_embed" else "pos_embed")
            batch = self.batch

            def embed_hook(_module, _args, output):
                value = output
                if name == "hook_pos_embed" and output.shape[0] != batch["size"]:  # GPT-2's wpe gives [1, pos, d_model]
                    value = einops.repeat(output[0], "pos d_model -> batch pos d_model", batch=batch["size"])
                return _checked(point, value, fn(value))  # GPT-2 adds the two embeddings, so [batch, ...] broadcasts

            self.handles.append(module.register_forward_hook(embed_hook))
        elif name == "ln_final.hook_normalized":

            def normalized_hook(_module, _args, output):
                value = first_tensor(output)
                new = _checked(point, value, fn(value))
                return None if new is None else replace_first(output, new)

            self.handles.append(final_norm(view).register_forward_hook(normalized_hook))
        elif name == "ln_final.hook_scale":
            if self.scale_fns is None:
                self._install_scale()
            self.scale_fns.append(lambda scale: _checked(point, scale, fn(scale)))
        else:  # pragma: no cover - GLOBALS and this function are kept in step
            raise AssertionError(name)

    def _install_scale(self) -> None:
        """One pre-hook computing the final norm's scale (passed through every scale function, in order) and, if a
        function replaced it, one forward hook recomputing the norm with the new scale."""
        norm = unwrap(final_norm(self.view))  # under an SSF-style wrapper, the norm itself
        centred, eps, weight, bias = norm_parameters(norm)
        fns: list[Callable] = []
        replaced: dict[str, torch.Tensor] = {}

        def scale_pre_hook(_module, args, kwargs):
            replaced.pop("scale", None)  # nothing left over from a forward pass that raised
            scale = norm_scale(_input_tensor(args, kwargs), centred, eps)[..., None]  # [batch, pos, 1]
            changed = False
            for f in fns:
                new = f(scale)
                if new is not None:
                    scale, changed = new, True
            if changed:
                replaced["scale"] = scale
            return None

        def scale_hook(_module, args, kwargs, output):
            scale = replaced.pop("scale", None)
            if scale is None:
                return None
            x = _input_tensor(args, kwargs)
            return _normalize(x, scale, centred, weight, bias)

        self.handles.append(norm.register_forward_pre_hook(scale_pre_hook, with_kwargs=True))
        # prepended: a norm recomputed with the new scale is what the ln_final.hook_normalized hooks then see
        self.handles.append(norm.register_forward_hook(scale_hook, with_kwargs=True, prepend=True))
        self.scale_fns = fns

    def _watch_decoder_input(self, embed: bool) -> None:
        """A pre-hook on GPT-2's bare model: records the batch size (``wpe`` runs on one row of positions) and refuses
        ``token_type_ids`` while ``hook_embed`` is active (GPT-2 embeds them with ``wte`` too)."""
        if self.batch is None:
            self.batch = {"size": 1, "embed": False}
            batch = self.batch
            parent_path = self.view.block_list_path.rpartition(".")[0]
            decoder = self.view.model.get_submodule(parent_path) if parent_path else self.view.model

            def input_pre_hook(_module, args, kwargs):
                tokens = args[0] if args else kwargs.get("input_ids")
                if tokens is None:
                    tokens = kwargs.get("inputs_embeds")
                if tokens is not None:
                    batch["size"] = tokens.shape[0]
                if batch["embed"] and kwargs.get("token_type_ids") is not None:
                    raise ValueError(
                        "'hook_embed' reads GPT-2's token embedding wte, which also embeds 'token_type_ids': run "
                        "without token_type_ids while hook_embed is active."
                    )
                return None

            self.handles.append(decoder.register_forward_pre_hook(input_pre_hook, with_kwargs=True))
        self.batch["embed"] = self.batch["embed"] or embed

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for registry, module, hook in self.pattern_entries:
            entries = registry.get(module, [])
            if hook in entries:
                entries.remove(hook)
            if not entries and module in registry:
                del registry[module]
        self.pattern_entries.clear()


def _checked(point: HookPoint, value: torch.Tensor, new) -> torch.Tensor | None:
    """A hook function's replacement, checked against the activation's shape (``None``: leave it)."""
    if new is None:
        return None
    if not isinstance(new, torch.Tensor) or new.shape != value.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(
            f"A hook on {point.name!r} returned {got}; it must return None or a tensor of shape {tuple(value.shape)}."
        )
    return new.contiguous()  # an expanded or transposed tensor would break the modules' .view calls


def _normalize(x: torch.Tensor, scale: torch.Tensor, centred: bool, weight, bias) -> torch.Tensor:
    """A LayerNorm (``centred``) or RMSNorm of ``x [batch, pos, d_model]`` with a given ``scale [batch, pos, 1]``."""
    y = x.float()
    if centred:  # LayerNorm: (x - mean) / scale * weight + bias, in float32
        y = (y - y.mean(-1, keepdim=True)) / scale
        y = y if weight is None else y * weight.float()
        return (y if bias is None else y + bias.float()).to(x.dtype)
    y = (y / scale).to(x.dtype)  # RMSNorm as Llama computes it: weight * (x / rms(x)) in the input dtype
    return y if weight is None else weight * y


@contextmanager
def hooks(
    model: nn.Module,
    fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
    cache: dict | None = None,
    names_filter=None,
    positions=None,
    detach: bool = True,
    view: ModelView | None = None,
) -> Iterator[ModelView]:
    """Context manager: install forward hooks (and optionally a cache) on a Hugging Face decoder.

    Parameters
    ----------
    model : nn.Module
        A GPT-2 or Llama-family model (``*ForCausalLM`` or the bare model), wrapped or not by adapters.
    fwd_hooks : iterable of (name or predicate, fn), default=()
        ``fn(activation, hook_point)`` is called with the activation in its canonical shape (see the module
        table) and may return a tensor of the same shape to replace it, or ``None`` to leave it.
    cache : dict, optional
        If given, the activations selected by ``names_filter`` are stored in it under their full names.
    names_filter : str, list of str or callable, optional
        Which activations to cache: a name, a list of names, or a predicate ``name -> bool`` over
        :func:`hook_names` (``lambda n: True`` includes every ``attn.hook_result``, ``n_heads`` times the size of
        the attention output per layer). Only these are stored (nothing is cached when ``None``).
    positions : int, list of int or slice, optional
        Cache only these sequence positions (the ``q_pos`` axis for patterns).
    detach : bool, default=True
        Store detached tensors (set False to keep the autograd graph, e.g. for gradients w.r.t. activations).
    view : ModelView, optional
        The model's view, when the caller already has one (saves rebuilding it on every call).

    Yields
    ------
    ModelView
        The canonical view of ``model``. On exit, every hook is removed and the attention implementation is
        restored, even if the body raised.
    """
    view = _view(model if view is None else view)
    installer = _Installer(view)
    points: list[tuple[HookPoint, Callable]] = []
    for item in fwd_hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise TypeError(f"Each entry of 'fwd_hooks' must be a (name, fn) pair with a callable fn. Got {item!r}.")
        selector, fn = item
        for point in resolve_names(selector, view):
            points.append((point, lambda value, fn=fn, point=point: fn(value, point)))
    if cache is not None:
        for point in resolve_names(names_filter, view):
            points.append((point, _cache_fn(cache, point, positions, detach)))
    elif names_filter is not None:
        raise ValueError("'names_filter' selects what to cache: pass a dict as 'cache' too (or use run_with_cache).")

    config = view.config
    previous_implementation = getattr(config, "_attn_implementation", None)
    switch = any(p.suffix in ("attn.hook_pattern", "attn.hook_attn_scores") for p, _ in points)
    try:
        if switch:
            _register_attention()
            config._attn_implementation = ATTENTION_IMPLEMENTATION
        for point, fn in points:
            installer.add(point, fn)
        yield view
    finally:
        installer.remove()
        if switch:
            config._attn_implementation = previous_implementation


def _cache_fn(cache: dict, point: HookPoint, positions, detach: bool) -> Callable:
    def store(value: torch.Tensor) -> None:
        kept = value
        if positions is not None:
            index = positions if isinstance(positions, slice) else torch.as_tensor(positions, device=value.device)
            axis = 2 if point.suffix in ("attn.hook_pattern", "attn.hook_attn_scores") else 1  # q_pos for patterns
            kept = value[(slice(None),) * axis + (index,)]
        cache[point.name] = kept.detach() if detach else kept
        return None

    return store


class ActivationCache(dict):
    """Cached activations by full name; ``cache["z", 0]`` is ``cache["layers.0.attn.hook_z"]``.

    Global activations take TransformerLens' short names: ``cache["embed"]``, ``cache["pos_embed"]``,
    ``cache["scale"]`` (``ln_final.hook_scale``) and ``cache["normalized"]`` (``ln_final.hook_normalized``).
    """

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise KeyError(f"Index the cache with a full name or a (component, layer) pair. Got {key!r}.")
            key = act_name(*key)
        elif key in GLOBAL_SHORT_NAMES:
            key = GLOBAL_SHORT_NAMES[key]
        elif key in SHORT_NAMES:
            raise KeyError(f"Component {key!r} belongs to a layer: index the cache with cache[{key!r}, layer].")
        key = canonical_name(key)
        if not dict.__contains__(self, key):
            raise KeyError(f"{key!r} is not in this cache, which holds {sorted(self)}. Select it with 'names_filter'.")
        return dict.__getitem__(self, key)

    def stack(self, component: str) -> torch.Tensor:
        """The cached activations of ``component`` for every cached layer, stacked on a new first axis."""
        if component in GLOBAL_SHORT_NAMES or component in GLOBALS:
            raise KeyError(
                f"Component {component!r} is global (one per model), not per layer: read it as cache[{component!r}]."
            )
        suffix = "." + SHORT_NAMES.get(component, component)
        names = [n for n in self if _NAME.match(n) and n.endswith(suffix)]
        names.sort(key=lambda n: int(_NAME.match(n).group(1)))
        if not names:
            raise KeyError(f"No cached activation of component {component!r}.")
        return torch.stack([dict.__getitem__(self, n) for n in names])


def _check_ids_fit(model: nn.Module, input_ids, owner: str) -> None:
    """Token ids in the model's vocabulary, checked before any hook is installed (not an IndexError inside it)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"The 'input_ids' parameter of {owner} must be a tensor of token ids [batch, pos]. Got {type(input_ids).__name__}.")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"The 'input_ids' parameter of {owner} must hold integer token ids. Got dtype {input_ids.dtype}.")
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get() if callable(get) else None, "weight", None)
    if weight is not None and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(
                f"The 'input_ids' parameter of {owner} holds the token id {low if low < 0 else high}, outside the model's "
                f"vocabulary [0, {weight.shape[0] - 1}]. Encode the prompts with this model's tokenizer."
            )


def _forward(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else first_tensor(out)


def run_with_cache(
    model: nn.Module, input_ids: torch.Tensor, names_filter=None, positions=None, fwd_hooks=(), detach: bool = True,
    view: ModelView | None = None, **forward_kwargs
) -> tuple[torch.Tensor, ActivationCache]:
    """Run ``model`` once and return ``(logits, cache)`` with only the activations ``names_filter`` selects.

    ``names_filter=None`` caches nothing; pass a predicate such as ``lambda n: n.endswith("hook_z")`` for
    every head output. See :func:`hooks` for the other parameters.
    """
    _check_ids_fit(model, input_ids, "run_with_cache")
    cache = ActivationCache()
    with hooks(model, fwd_hooks=fwd_hooks, cache=cache, names_filter=names_filter, positions=positions, detach=detach, view=view):
        logits = _forward(model, input_ids, **forward_kwargs)
    return logits, cache


def run_with_hooks(model: nn.Module, input_ids: torch.Tensor, fwd_hooks=(), view: ModelView | None = None, **forward_kwargs) -> torch.Tensor:
    """Run ``model`` once with ``fwd_hooks`` (``[(name, fn), ...]``) installed; return the logits."""
    _check_ids_fit(model, input_ids, "run_with_hooks")
    with hooks(model, fwd_hooks=fwd_hooks, view=view):
        return _forward(model, input_ids, **forward_kwargs)
