"""Activation patching, batched over components: many patched copies of the corrupted input per forward pass.

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", arXiv 2202.05262, "causal tracing");
Wang et al. 2022 ("Interpretability in the Wild", arXiv 2211.00593); the convention of TransformerLens'
``patching`` module and of Heimersheim and Nanda 2024 ("How to use and interpret activation patching",
arXiv 2404.15255).

Rule: run the *corrupted* input; for one component c (a head's output at one position, a residual-stream
vector at one position, ...) replace its activation with the one it has on the *clean* input; read the
metric. With the metric averaged over the examples,

    effect(c) = (metric_patched(c) - metric_corrupt) / (metric_clean - metric_corrupt)

so 0 means "restoring c alone does nothing" and 1 means "restoring c alone restores the clean behaviour".

Batching: the corrupted batch of ``n`` examples is repeated ``k`` times along the batch axis and copy ``i``
is patched at component ``i`` of the chunk, so ``k`` components cost one forward pass instead of ``k``
(``batch_size`` bounds ``k * n``). Two exact savings on top, both from causality:

- components are swept from the last position backwards, and a chunk whose earliest patched position is
  ``p`` runs only positions ``p, p + 1, ...``: everything before ``p`` is the corrupted run's, so its keys
  and values come from the corrupted run's cache and its logits are the corrupted logits;
- a chunk whose components all sit in layers ``>= l`` starts at block ``l`` from the corrupted run's
  residual stream: the blocks below run on nothing that differs from the corrupted run;
- a component whose clean activation equals its corrupted one (positions before the first token where the
  prompts differ) cannot change anything: its patched metric is the corrupted metric, with no forward pass.

The numbers are those of one forward pass per component (tested; ``method="loop"`` is that reference).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import einops
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..._validation import check_int, check_option
from ...nn.kv_cache import cache_kwarg, output_cache
from ._common import as_ids, call_metric, check_head_indices, check_layers, check_pair, model_device
from .hooks import ActivationCache, _view, act_name, hooks, run_with_cache, run_with_hooks

PER_HEAD = ("z", "result", "q", "k", "v", "pattern")
PER_LAYER = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
COMPONENTS = PER_HEAD + PER_LAYER


@contextmanager
def eval_mode(*models):
    """Put models in eval mode (no dropout) and restore each module's training flag on exit."""
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for saved in flags:
            for module, training in saved:
                module.training = training


def to_pos_major(value: torch.Tensor, component: str) -> torch.Tensor:
    """Patterns ``[batch, head, q_pos, k_pos]`` as ``[batch, q_pos, head, k_pos]``; other activations unchanged."""
    return value.transpose(1, 2) if component == "pattern" else value


def n_heads_of(view, component: str) -> int:
    """Heads of a component: key and value projections have ``n_kv_heads`` (grouped-query attention)."""
    return view.n_kv_heads if component in ("k", "v") else view.n_heads


def head_kind(view, component: str) -> str:
    """How the heads of ``component`` are named in errors: key/value heads differ from query heads under GQA."""
    if component in ("k", "v") and view.n_kv_heads != view.n_heads:
        return (f"key/value heads (component {component!r} has the model's {view.n_kv_heads} key/value heads, "
                f"not its {view.n_heads} query heads: grouped-query attention)")
    return "heads"


@dataclass
class PatchingResult:
    """Effects of activation patching, one per component.

    Attributes
    ----------
    effect : Tensor
        ``[layer, pos, head]`` (per-head components, ``per_position=True``), ``[layer, head]``
        (``per_position=False``) or ``[layer, pos]`` (residual, attention and MLP outputs): normalised effect
        ``(patched - corrupt) / (clean - corrupt)``, or ``patched - corrupt`` when ``normalized`` is False.
    patched : Tensor
        Same shape: the mean metric of each patched run.
    clean_metric, corrupt_metric : float
        Mean metric of the clean and the corrupted run.
    dims : tuple of str
        Axis names of ``effect``.
    layers, positions, heads : list of int
        The index values along each axis (``positions`` are positions in the corrupted sequence).
    """

    effect: torch.Tensor
    patched: torch.Tensor
    clean_metric: float
    corrupt_metric: float
    component: str
    dims: tuple[str, ...]
    layers: list[int]
    positions: list[int] | None
    heads: list[int] | None
    normalized: bool = True
    tokens: list[str] | None = field(default=None, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per component: its indices, ``effect`` and ``patched``."""
        axes = {"layer": self.layers, "pos": self.positions, "head": self.heads}
        grids = torch.meshgrid(*[torch.arange(len(axes[d])) for d in self.dims], indexing="ij")
        frame = {d: [axes[d][i] for i in g.flatten().tolist()] for d, g in zip(self.dims, grids)}
        frame["effect"] = self.effect.flatten().tolist()
        frame["patched"] = self.patched.flatten().tolist()
        return pd.DataFrame(frame)

    def top(self, k: int = 10, largest: bool = True) -> pd.DataFrame:
        """The ``k`` components with the largest (or, with ``largest=False``, the smallest) effect."""
        return self.to_frame().sort_values("effect", ascending=not largest).head(k).reset_index(drop=True)

    def plot(self, title: str | None = None, **kwargs):
        """Heatmap of the effects (see :func:`ftanalysis.probes.circuits.plots.patching_heatmap`)."""
        from .plots import patching_heatmap

        return patching_heatmap(self, title=title, **kwargs)


def _parse_positions(positions, clean_len: int, corrupt_len: int, owner: str) -> tuple[list[int], list[int], bool]:
    """``(clean_positions, corrupt_positions, aligned)`` from None, ints or (clean, corrupt) pairs."""
    if positions is None:
        return list(range(clean_len)), list(range(corrupt_len)), False
    items = [positions] if isinstance(positions, (int, tuple)) else list(positions)
    aligned = bool(items) and all(isinstance(p, (tuple, list)) for p in items)
    if not aligned and any(isinstance(p, (tuple, list)) for p in items):
        raise ValueError(f"{owner}: 'positions' must be all ints or all (clean_pos, corrupt_pos) pairs. Got {positions!r}.")
    clean_pos, corrupt_pos = [], []
    for p in items:
        pair = tuple(p) if aligned else (p, p)
        if len(pair) != 2:
            raise ValueError(f"{owner}: each aligned position must be a (clean_pos, corrupt_pos) pair. Got {p!r}.")
        for value, length, which in ((pair[0], clean_len, "clean"), (pair[1], corrupt_len, "corrupt")):
            if isinstance(value, bool) or not isinstance(value, int) or not -length <= value < length:
                raise ValueError(f"{owner}: position {value!r} is out of range for the {which} sequence of length {length}.")
        clean_pos.append(pair[0] % clean_len)
        corrupt_pos.append(pair[1] % corrupt_len)
    if not clean_pos:
        raise ValueError(f"{owner}: 'positions' is empty.")
    return clean_pos, corrupt_pos, aligned


def activation_patching(
    model: torch.nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    component: str = "z",
    *,
    layers=None,
    heads=None,
    positions=None,
    per_position: bool = True,
    normalize: bool = True,
    batch_size: int = 512,
    method: str = "batched",
    progress: bool = False,
) -> PatchingResult:
    """Patch the clean activation of each component into the corrupted run and measure the metric.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face GPT-2 or Llama-family causal LM (run as is: no conversion, no weight processing).
    clean_ids, corrupt_ids : LongTensor ``[batch, pos]``
        Paired prompts (row ``i`` of one is the counterpart of row ``i`` of the other), same length unless
        ``positions`` aligns them.
    metric : callable
        ``metric(logits [batch, pos, vocab]) -> [batch]``: one scalar per example (see ``metrics.py``:
        ``logit_diff``, ``answer_logprob``). It is averaged over the examples.
    component : str, default="z"
        ``"z"`` (a head's output, the input of the output projection), ``"result"`` (a head's output written
        into the residual stream, ``z`` through its columns of the output projection: the same effects as
        ``"z"``, for TransformerLens users), ``"q"``, ``"k"``, ``"v"``,
        ``"pattern"`` (a head's attention row at one query position), or a per-layer activation
        ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``, ``"mlp_out"``.
    layers, heads : list of int, optional
        Restrict the sweep (all by default).
    positions : list of int or list of (int, int), optional
        Positions to sweep (all by default). Pairs ``(clean_pos, corrupt_pos)`` align sequences of
        different lengths: the clean activation at ``clean_pos`` is written at ``corrupt_pos``.
    per_position : bool, default=True
        For per-head components: one effect per (layer, position, head); with False, each head is patched
        at all swept positions at once, giving ``[layer, head]``.
    normalize : bool, default=True
        Report ``(patched - corrupt) / (clean - corrupt)``; with False, ``patched - corrupt``.
    batch_size : int, default=512
        Rows per forward pass: ``batch_size // batch`` components are patched per pass.
    method : {"batched", "loop"}, default="batched"
        ``"loop"`` runs one forward pass per component (the reference the batched path is tested against).
    progress : bool, default=False
        Show a tqdm bar over forward passes.

    Returns
    -------
    PatchingResult
        ``effect`` of shape ``[layer, pos, head]``, ``[layer, head]`` or ``[layer, pos]``.

    Notes
    -----
    Direction and normalisation follow DESIGN.md (run corrupted, patch clean in). Dropout is off during the
    runs (the models' training flags are restored). For ``"k"``/``"v"`` the head axis has ``n_kv_heads``.

    Examples
    --------
    >>> import torch, ftanalysis as fta
    >>> from ftanalysis.probes.circuits import logit_diff
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> enc = lambda s: torch.tensor([tok(s)["input_ids"]])
    >>> clean = enc("the cup is in box A , the map is in box B . box A contains the")
    >>> corrupt = enc("the cup is in box A , the map is in box B . box B contains the")
    >>> ids = tok.convert_tokens_to_ids
    >>> result = fta.probes.activation_patching(model, clean, corrupt, logit_diff([ids("cup")], [ids("map")]))
    >>> tuple(result.effect.shape)  # [layer, pos, head]
    (2, 20, 4)
    """
    owner = "activation_patching"
    check_option(component, "component", owner, COMPONENTS)
    check_option(method, "method", owner, ("batched", "loop"))
    check_int(batch_size, "batch_size", owner, 1)
    view = _view(model)
    device = model_device(model)
    clean = as_ids(clean_ids, "clean_ids", owner, device, model=model)
    corrupt = as_ids(corrupt_ids, "corrupt_ids", owner, device, model=model)
    clean_pos, corrupt_pos, aligned = _parse_positions(positions, clean.shape[1], corrupt.shape[1], owner)
    check_pair(clean, corrupt, owner, aligned=aligned)
    per_head = component in PER_HEAD
    layers = check_layers(layers, view, owner)
    if per_head:
        heads = check_head_indices(heads, n_heads_of(view, component), owner, head_kind(view, component))
    elif heads is not None:
        raise ValueError(f"{owner}: 'heads' applies to per-head components {list(PER_HEAD)}, not to {component!r}.")
    n = clean.shape[0]

    with eval_mode(model), torch.no_grad():
        names = [act_name(component, layer) for layer in layers]
        clean_logits, cache = run_with_cache(model, clean, names_filter=names)
        clean_metric = float(call_metric(metric, clean_logits, n, owner).mean())
        corrupt_run = _CorruptRun.of(model, corrupt, names, method == "batched")
        corrupt_metric = float(call_metric(metric, corrupt_run.logits, n, owner).mean())
        sources = {layer: to_pos_major(cache[component, layer], component) for layer in layers}

        # components: (layer, clean positions, corrupt positions, head or None), in output order
        if per_head and per_position:
            dims = ("layer", "pos", "head")
            comps = [(ly, cp, xp, h) for ly in layers for cp, xp in zip(clean_pos, corrupt_pos) for h in heads]
        elif per_head:
            dims = ("layer", "head")
            all_clean, all_corrupt = torch.tensor(clean_pos, device=device), torch.tensor(corrupt_pos, device=device)
            comps = [(ly, all_clean, all_corrupt, h) for ly in layers for h in heads]
        else:
            dims = ("layer", "pos")
            comps = [(ly, cp, xp, None) for ly in layers for cp, xp in zip(clean_pos, corrupt_pos)]
        k = 1 if method == "loop" else max(1, batch_size // n)
        values: list[float] = [corrupt_metric] * len(comps)
        order = list(range(len(comps)))
        if method == "batched":
            targets = {layer: to_pos_major(corrupt_run.cache[component, layer], component) for layer in layers}
            order = [i for i in order if not _unchanged(comps[i], sources, targets)]  # exact: effect 0
            order.sort(key=lambda i: (comps[i][0], -_first_position(comps[i][2])))  # by layer, latest positions first
        chunks = _chunks(order, comps, k, span=max(1, corrupt.shape[1] // 4) if method == "batched" else None)
        for chunk_index in tqdm(chunks, desc=f"patching {component}", disable=not progress):
            chunk = [comps[i] for i in chunk_index]
            for i, value in zip(chunk_index, _run_chunk(model, corrupt_run, chunk, sources, component, metric, n, owner, view)):
                values[i] = value

    shape = {"layer": len(layers), "pos": len(corrupt_pos), "head": len(heads) if per_head else 0}
    patched = torch.tensor(values).reshape([shape[d] for d in dims])
    effect = patched - corrupt_metric
    if normalize:
        gap = clean_metric - corrupt_metric
        if abs(gap) < 1e-12:
            raise ValueError(
                f"{owner}: the metric is the same on the clean and the corrupted input ({clean_metric:.6g}), so the "
                "normalised effect is undefined. Use inputs that differ in the metric, or normalize=False."
            )
        effect = effect / gap
    return PatchingResult(
        effect=effect,
        patched=patched,
        clean_metric=clean_metric,
        corrupt_metric=corrupt_metric,
        component=component,
        dims=dims,
        layers=layers,
        positions=corrupt_pos if "pos" in dims else None,
        heads=heads if per_head else None,
        normalized=normalize,
    )


def _chunks(order: list[int], comps: list, k: int, span: int | None) -> list[list[int]]:
    """Split ``order`` into forward passes of at most ``k`` components; with ``span``, a pass also stays in one
    layer and covers fewer than ``span`` positions, so that it can skip the blocks below and the positions before."""
    chunks: list[list[int]] = []
    for i in order:
        if chunks and len(chunks[-1]) < k:
            first = comps[chunks[-1][0]]
            if span is None or (comps[i][0] == first[0] and _first_position(first[2]) - _first_position(comps[i][2]) < span):
                chunks[-1].append(i)
                continue
        chunks.append([i])
    return chunks


def _first_position(corrupt_p) -> int:
    return int(corrupt_p.min()) if isinstance(corrupt_p, torch.Tensor) else int(corrupt_p)


def _unchanged(comp, sources, targets) -> bool:
    """True when the clean activation of ``comp`` equals the corrupted one, so patching it changes nothing."""
    layer, clean_p, corrupt_p, head = comp
    if isinstance(corrupt_p, torch.Tensor) or sources[layer].shape[1:] != targets[layer].shape[1:]:
        return False
    src, dst = sources[layer][:, clean_p], targets[layer][:, corrupt_p]
    return bool(torch.equal(src, dst) if head is None else torch.equal(src[:, head], dst[:, head]))


@dataclass
class _CorruptRun:
    """The corrupted run: its logits, the swept activations, and its key/value cache (None if unavailable)."""

    ids: torch.Tensor
    logits: torch.Tensor
    cache: object
    past: object
    blocks: list | None = None  # the decoder blocks, when they can be skipped (each returns a plain tensor)

    @classmethod
    def of(cls, model, corrupt: torch.Tensor, names: list[str], fast: bool) -> "_CorruptRun":
        """The corrupted run; with ``fast``, also its cache, residual streams and skippable blocks."""
        if fast:
            view = _view(model)
            names = list(dict.fromkeys([*names, *(act_name("resid_pre", layer) for layer in range(view.n_layers))]))
            cache, outputs = ActivationCache(), []
            probe = view.blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append(isinstance(out, torch.Tensor)))
            try:
                with hooks(model, cache=cache, names_filter=names, view=view):
                    out = model(input_ids=corrupt, use_cache=True)
            except TypeError:  # a model whose forward takes no cache argument
                out = None
            finally:
                probe.remove()
            past = output_cache(out) if out is not None else None
            if out is not None and hasattr(out, "logits") and _usable_past(past):
                skippable = all(outputs) and not any("forward" in vars(b) for b in view.blocks)
                return cls(corrupt, out.logits, cache, past, list(view.blocks) if skippable else None)
        logits, cache = run_with_cache(model, corrupt, names_filter=names)
        return cls(corrupt, logits, cache, None)

    def prefix_cache(self, p: int, k: int):
        """A fresh cache holding the corrupted keys and values of positions ``< p``, tiled ``k`` times."""
        from transformers import DynamicCache

        fresh = DynamicCache()
        for layer_idx, layer in enumerate(self.past.layers):
            fresh.update(layer.keys[:, :, :p].repeat(k, 1, 1, 1), layer.values[:, :, :p].repeat(k, 1, 1, 1), layer_idx)
        return fresh


def _usable_past(past) -> bool:
    layers = getattr(past, "layers", None)
    return bool(layers) and all(getattr(layer, "keys", None) is not None for layer in layers)


def _run_chunk(model, corrupt_run: _CorruptRun, chunk, sources, component, metric, n, owner, view) -> list[float]:
    """One forward pass over ``len(chunk)`` copies of the corrupted batch, copy ``i`` patched at ``chunk[i]``.

    With the corrupted run's cache, only positions from the chunk's earliest patched one onwards are run.
    """
    k = len(chunk)
    corrupt = corrupt_run.ids
    start = min(_first_position(c[2]) for c in chunk) if corrupt_run.past is not None else 0
    by_layer: dict[int, list] = defaultdict(list)
    for copy, (layer, clean_p, corrupt_p, head) in enumerate(chunk):
        by_layer[layer].append((copy, clean_p, corrupt_p - start, head))

    def make_hook(layer: int):
        src = sources[layer]  # clean activation, position-major [n, pos, (head,) ...]

        def hook(value: torch.Tensor, _point) -> torch.Tensor:
            v = einops.rearrange(to_pos_major(value, component), "(k n) ... -> k n ...", k=k).clone()
            for copy, clean_p, corrupt_p, head in by_layer[layer]:
                if head is None:
                    v[copy][:, corrupt_p] = src[:, clean_p]
                else:
                    v[copy][:, corrupt_p, head] = src[:, clean_p, head]
            return to_pos_major(einops.rearrange(v, "k n ... -> (k n) ..."), component)

        return hook

    fwd_hooks = [(act_name(component, layer), make_hook(layer)) for layer in by_layer]
    if start == 0 and corrupt_run.blocks is None:
        logits = run_with_hooks(model, corrupt.repeat(k, 1), fwd_hooks=fwd_hooks, view=view)  # [k * n, pos, vocab], copy-major
    else:
        first_layer = min(by_layer) if corrupt_run.blocks is not None else 0
        resid = corrupt_run.cache["resid_pre", first_layer][:, start:].repeat(k, 1, 1) if first_layer else None
        kwargs = {cache_kwarg(model): corrupt_run.prefix_cache(start, k), "use_cache": True} if start else {}
        with _skipping(corrupt_run.blocks, first_layer, resid):
            tail = run_with_hooks(model, corrupt[:, start:].repeat(k, 1), fwd_hooks=fwd_hooks, view=view, **kwargs)
        logits = torch.cat([corrupt_run.logits[:, :start].repeat(k, 1, 1), tail], dim=1) if start else tail
    return [float(call_metric(metric, logits[i * n : (i + 1) * n], n, owner).mean()) for i in range(k)]


@contextmanager
def _skipping(blocks, upto: int, resid):
    """Blocks ``0 .. upto - 1`` return ``resid`` (the corrupted residual stream entering block ``upto``) without
    computing anything."""
    skipped = list(blocks[:upto]) if upto else []
    for block in skipped:
        block.forward = lambda *args, **kwargs: resid
    try:
        yield
    finally:
        for block in skipped:
            del block.forward
