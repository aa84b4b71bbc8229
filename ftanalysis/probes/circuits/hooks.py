"""Read and overwrite the activations of plain Hugging Face decoders, under TransformerLens' names.

No conversion: the hooks sit on the modules of the model as Hugging Face builds it (GPT-2 and the Llama
family: Llama, Qwen2, Mistral), found through :class:`ftanalysis.nn.ModelView`. Names use the package's
``layers.{l}.`` prefix with TransformerLens' suffixes:

=================================  ===============================  ==========================================
name                               shape                            where it is read
=================================  ===============================  ==========================================
``layers.{l}.hook_resid_pre``      ``[batch, pos, d_model]``        input of block ``l``
``layers.{l}.hook_resid_mid``      ``[batch, pos, d_model]``        input of the block's second norm
``layers.{l}.hook_resid_post``     ``[batch, pos, d_model]``        output of block ``l``
``layers.{l}.hook_attn_out``       ``[batch, pos, d_model]``        output of the attention module
``layers.{l}.hook_mlp_out``        ``[batch, pos, d_model]``        output of the MLP
``layers.{l}.attn.hook_q``         ``[batch, pos, head, d_head]``   query projection (before RoPE)
``layers.{l}.attn.hook_k``         ``[batch, pos, kv_head, d_head]`` key projection (before RoPE)
``layers.{l}.attn.hook_v``         ``[batch, pos, kv_head, d_head]`` value projection
``layers.{l}.attn.hook_z``         ``[batch, pos, head, d_head]``   input of the output projection
``layers.{l}.attn.hook_attn_scores`` ``[batch, head, q_pos, k_pos]`` scaled scores before the softmax;
                                                                    masked entries hold the dtype's most
                                                                    negative value (TransformerLens: -inf)
``layers.{l}.attn.hook_pattern``   ``[batch, head, q_pos, k_pos]``  softmax of the attention scores
``layers.{l}.mlp.hook_post``       ``[batch, pos, d_mlp]``          neuron activations: the input of the MLP's
                                                                    down projection (``act(gate) * up`` in Llama)
=================================  ===============================  ==========================================

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

from ...nn.view import ModelView

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
    "attn.hook_attn_scores": "batch head q_pos k_pos",
    "attn.hook_pattern": "batch head q_pos k_pos",
    "mlp.hook_post": "batch pos d_mlp",
}
# short names accepted by ``cache[short, layer]`` and by the patching functions' ``component``
SHORT_NAMES: dict[str, str] = {s.split("hook_")[-1]: s for s in SUFFIXES}
HOOKED_FAMILIES = ("gpt2", "llama")
ATTENTION_IMPLEMENTATION = "ftanalysis_hooked"
_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
# TransformerLens names its blocks "blocks.{l}"; its per-layer hook names are otherwise the same as ours
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
# TransformerLens hooks without a counterpart here (named in the error, so a user knows it is not a typo)
TL_ONLY_SUFFIXES = (
    "hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "attn.hook_rot_q",
    "attn.hook_rot_k", "mlp.hook_pre", "mlp.hook_pre_linear", "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale",
    "ln2.hook_normalized",
)
TL_ONLY_GLOBAL = ("hook_embed", "hook_pos_embed", "hook_tokens", "ln_final.hook_scale", "ln_final.hook_normalized")
# the second norm of a block, whose input is hook_resid_mid
_SECOND_NORM = {"gpt2": "ln_2", "llama": "post_attention_layernorm"}

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


@dataclass(frozen=True)
class HookPoint:
    """A named activation of one layer (what a hook function receives as its second argument)."""

    name: str  # e.g. "layers.1.attn.hook_z"
    layer: int
    suffix: str  # e.g. "attn.hook_z"

    @property
    def shape(self) -> str:
        """The activation's axes, e.g. ``"batch pos head d_head"``."""
        return SUFFIXES[self.suffix]

    @property
    def short(self) -> str:
        """The short name (``"z"``, ``"resid_pre"``, ...)."""
        return self.suffix.split("hook_")[-1]


def act_name(component: str, layer: int) -> str:
    """Full hook name of a short component name: ``act_name("z", 3) == "layers.3.attn.hook_z"``."""
    if component in SUFFIXES:
        return f"layers.{layer}.{component}"
    if component not in SHORT_NAMES:
        raise ValueError(f"Unknown component {component!r}. Known components: {list(SHORT_NAMES)}.")
    return f"layers.{layer}.{SHORT_NAMES[component]}"


def hook_names(model_or_view) -> list[str]:
    """Every hook name of a model, in layer order."""
    view = _view(model_or_view)
    return [f"layers.{layer}.{suffix}" for layer in range(view.n_layers) for suffix in SUFFIXES]


def canonical_name(name: str) -> str:
    """Our name for a TransformerLens-style hook name: ``"blocks.3.attn.hook_z"`` -> ``"layers.3.attn.hook_z"``."""
    match = _TL_NAME.match(name) if isinstance(name, str) else None
    return f"layers.{match.group(1)}.{match.group(2)}" if match else name


def parse_name(name: str, view: ModelView) -> HookPoint:
    """The :class:`HookPoint` of a full hook name (``ValueError`` naming what exists otherwise).

    TransformerLens' ``blocks.{l}.`` prefix is accepted as an alias of ``layers.{l}.``; the point's ``name`` is
    always ours, so caches are keyed by it (and :class:`ActivationCache` accepts either spelling).
    """
    if not isinstance(name, str):
        raise TypeError(f"Hook names must be str. Got {type(name).__name__} ({name!r}).")
    name = canonical_name(name)
    match = _NAME.match(name)
    if match is None or match.group(2) not in SUFFIXES:
        bare = match.group(2) if match else name
        if bare in TL_ONLY_SUFFIXES or bare in TL_ONLY_GLOBAL:
            raise ValueError(
                f"{name!r} is a TransformerLens hook that this package does not provide. Hook names here are "
                f"'layers.{{l}}.<suffix>' (or TransformerLens' 'blocks.{{l}}.<suffix>') with suffix one of {list(SUFFIXES)}."
            )
        raise ValueError(
            f"Unknown hook name {name!r}. Names are 'layers.{{l}}.<suffix>' (or TransformerLens' 'blocks.{{l}}.<suffix>') "
            f"with suffix one of {list(SUFFIXES)}."
        )
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

    def add(self, point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Install ``fn(canonical activation) -> replacement or None`` at ``point``."""
        view, family, layer, suffix = self.view, self.view.family, point.layer, point.suffix
        block = view.block(layer)
        attn = view.attention(layer)

        def checked(value: torch.Tensor, new) -> torch.Tensor | None:
            if new is None:
                return None
            if not isinstance(new, torch.Tensor) or new.shape != value.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"A hook on {point.name!r} returned {got}; it must return None or a tensor of shape {tuple(value.shape)}.")
            return new.contiguous()  # an expanded or transposed tensor would break the modules' .view calls

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
        Which activations to cache: a name, a list of names, or a predicate ``name -> bool``. Only these are
        stored (nothing is cached when ``None``).
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
    """Cached activations by full name; ``cache["z", 0]`` is ``cache["layers.0.attn.hook_z"]``."""

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise KeyError(f"Index the cache with a full name or a (component, layer) pair. Got {key!r}.")
            key = act_name(*key)
        key = canonical_name(key)
        if not dict.__contains__(self, key):
            raise KeyError(f"{key!r} is not in this cache, which holds {sorted(self)}. Select it with 'names_filter'.")
        return dict.__getitem__(self, key)

    def stack(self, component: str) -> torch.Tensor:
        """The cached activations of ``component`` for every cached layer, stacked on a new first axis."""
        names = [n for n in self if n.endswith("." + SHORT_NAMES.get(component, component))]
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
