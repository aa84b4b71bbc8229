"""Path patching: the effect of one head on the output *through a chosen set of receivers only*.

Wang, Variengien, Conmy, Shlegeris and Steinhardt 2022, "Interpretability in the Wild: a Circuit for Indirect
Object Identification in GPT-2 small" (arXiv 2211.00593, Appendix B); Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching" (arXiv 2304.05969); the iterated, per-group use of Prakash
et al. 2024, "Fine-Tuning Enhances Existing Mechanisms" (arXiv 2402.14811).

Recipe, for each sender head ``h`` (three forward passes, all batched over senders):

1. cache every head's output (``hook_z``) on the clean and on the corrupted input;
2. run the clean input with every head frozen to its clean output, except ``h`` at the sender positions,
   which takes its corrupted output (MLPs are recomputed unless ``freeze_mlps``); record the receivers'
   inputs (their ``q``, ``k`` or ``v`` projection at the receiver positions);
3. run the clean input with only the receivers' inputs replaced by the recorded ones; read the metric.

With ``receiver_input="logits"`` step 3 is skipped and the metric is read in step 2 (the sender's direct
path to the logits, plus the paths through MLPs). The score is normalised as in Wang et al.'s figures:

    effect(h) = (metric_patched(h) - metric_clean) / (metric_clean - metric_corrupt)

so 0 means "no effect through these receivers" and -1 means "this path alone carries the whole corruption";
the important senders are the most negative.

Savings, all exact (causality; ``skip_unchanged=False`` runs everything, the reference they are tested against):

- a sender whose corrupted output equals its clean one at every sender position changes nothing: its patched
  metric is the clean metric, with no forward pass (the positions before the first token where the prompts
  differ are such positions);
- steps 2 and 3 start at the first position where anything differs from the clean run, on the clean run's
  key/value cache, and at the lowest patched layer, on the clean residual stream: the blocks below and the
  positions before are the clean run's. Senders are grouped by layer and position so that a pass can skip.
  Path patching to the logits at the last position (Wang et al.'s name movers) then runs one position per
  copy instead of the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..._validation import check_int, check_option
from ...nn.kv_cache import cache_kwarg
from ._common import Head, as_ids, call_metric, check_heads, check_pair, model_device, position_mask
from .hooks import _view, act_name, run_with_cache, run_with_hooks
from .patching import _chunks, _CorruptRun, _skipping, eval_mode

RECEIVER_INPUTS = ("q", "k", "v", "logits")


@dataclass
class PathPatchingResult:
    """Path-patching scores of every sender head, ``effect[layer, head]`` (NaN where not a sender)."""

    effect: torch.Tensor  # [layer, head]
    patched: torch.Tensor  # [layer, head]: mean metric of the patched run
    clean_metric: float
    corrupt_metric: float
    receivers: list[Head]
    receiver_input: str

    def to_frame(self) -> pd.DataFrame:
        n_layers, n_heads = self.effect.shape
        rows = [
            {"layer": layer, "head": head, "effect": float(self.effect[layer, head]), "patched": float(self.patched[layer, head])}
            for layer in range(n_layers)
            for head in range(n_heads)
            if not torch.isnan(self.effect[layer, head])
        ]
        return pd.DataFrame(rows)

    def top(self, k: int = 5, most_negative: bool = True) -> list[Head]:
        """The ``k`` senders with the most negative (default) or most positive effect."""
        frame = self.to_frame().sort_values("effect", ascending=most_negative).head(k)
        return [(int(r.layer), int(r.head)) for r in frame.itertuples()]

    def plot(self, title: str | None = None, **kwargs):
        from .plots import head_heatmap

        if title is None:
            title = f"path patching -> {self.receiver_input} of {self.receivers}" if self.receivers else "path patching -> logits"
        return head_heatmap(self.effect, title=title, center=0.0, **kwargs)


def path_patching(
    model: torch.nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    metric,
    senders: list[Head] | None = None,
    receivers: list[Head] | None = None,
    receiver_input: str = "q",
    *,
    sender_positions=None,
    receiver_positions=None,
    freeze_mlps: bool = False,
    normalize: bool = True,
    batch_size: int = 512,
    skip_unchanged: bool = True,
    progress: bool = False,
) -> PathPatchingResult:
    """Score each sender head by its effect on the metric through the receivers' ``q``/``k``/``v`` (or the logits).

    Parameters
    ----------
    model : nn.Module
        GPT-2 or Llama-family Hugging Face causal LM.
    clean_ids, corrupt_ids : LongTensor ``[batch, pos]``
        Paired prompts of the same length.
    metric : callable
        ``metric(logits) -> [batch]``, averaged over the examples.
    senders : list of (layer, head), optional
        Heads to score. Default: every head below the deepest receiver (every head for ``"logits"``).
    receivers : list of (layer, head), optional
        Receiver heads (required unless ``receiver_input="logits"``). For ``"k"``/``"v"`` of a grouped-query
        model, a receiver ``h`` patches its key/value head ``h // (n_heads / n_kv_heads)``.
    receiver_input : {"q", "k", "v", "logits"}, default="q"
        Which input of the receivers carries the path (Q-, K- or V-composition), or the logits directly.
    sender_positions, receiver_positions : position spec, optional
        Where the sender takes its corrupted output, and where the receivers' inputs are patched: ``None``
        (all positions), an int or list of ints, a ``[batch]`` tensor of per-example positions, or a
        ``[batch, pos]`` boolean mask.
    freeze_mlps : bool, default=False
        Also freeze MLP outputs to their clean values in step 2 (only direct head-to-receiver paths count).
    normalize : bool, default=True
        Report ``(patched - clean) / (clean - corrupt)``; with False, ``patched - clean``.
    batch_size : int, default=512
        Rows per forward pass (``batch_size // batch`` senders per pass).
    skip_unchanged : bool, default=True
        Skip what cannot differ from the clean run (senders whose output the corruption leaves unchanged, the
        blocks below a pass's lowest sender or receiver, the positions before the first changed one). Exact;
        False runs every sender over the whole model and prompt.
    progress : bool, default=False
        Show a tqdm bar over forward passes.

    Returns
    -------
    PathPatchingResult
        ``effect[layer, head]``, NaN for heads that were not scored.

    Notes
    -----
    The base run is the *clean* input and the sender is corrupted (Wang et al.'s direction), the opposite of
    :func:`activation_patching`, because a path is scored by how much corrupting it alone breaks the clean
    behaviour. Prakash et al. normalise by the clean probability instead; the ranking of heads is the same.
    """
    owner = "path_patching"
    check_option(receiver_input, "receiver_input", owner, RECEIVER_INPUTS)
    check_int(batch_size, "batch_size", owner, 1)
    view = _view(model)
    device = model_device(model)
    clean = as_ids(clean_ids, "clean_ids", owner, device, model=model)
    corrupt = as_ids(corrupt_ids, "corrupt_ids", owner, device, model=model)
    check_pair(clean, corrupt, owner)
    n, seq = clean.shape
    if receiver_input == "logits":
        if receivers:
            raise ValueError(f"{owner}: receiver_input='logits' takes no 'receivers' (got {receivers!r}).")
        receivers = []
        deepest = view.n_layers
    else:
        if not receivers:
            raise ValueError(f"{owner}: receiver_input={receiver_input!r} needs a non-empty list of (layer, head) 'receivers'.")
        receivers = check_heads(receivers, view, owner, "receivers")
        deepest = max(layer for layer, _ in receivers)
    if senders is None:
        senders = [(layer, head) for layer in range(deepest) for head in range(view.n_heads)]
    else:
        senders = check_heads(senders, view, owner, "senders")
    send_mask = position_mask(sender_positions, n, seq, owner, "sender_positions", device)  # [batch, pos]
    recv_mask = position_mask(receiver_positions, n, seq, owner, "receiver_positions", device)

    layers = list(range(view.n_layers))
    z_names = [act_name("z", layer) for layer in layers]
    mlp_names = [act_name("mlp_out", layer) for layer in layers] if freeze_mlps else []
    recv_layers = sorted({layer for layer, _ in receivers})
    recv_names = [act_name(receiver_input, layer) for layer in recv_layers] if receivers else []
    with eval_mode(model), torch.no_grad():
        clean_run = _CorruptRun.of(model, clean, z_names + mlp_names + recv_names, fast=skip_unchanged)
        clean_logits, clean_cache = clean_run.logits, clean_run.cache
        corrupt_logits, corrupt_cache = run_with_cache(model, corrupt, names_filter=z_names)
        clean_metric = float(call_metric(metric, clean_logits, n, owner).mean())
        corrupt_metric = float(call_metric(metric, corrupt_logits, n, owner).mean())

        # senders at or above the deepest receiver cannot reach it: they keep NaN
        scored = [s for s in senders if s[0] < deepest]
        patched = torch.full((view.n_layers, view.n_heads), float("nan"))
        k = max(1, batch_size // n)
        # per sender: the first position where its corrupted output differs from the clean one (None: nowhere)
        first = {s: _first_change(clean_cache["z", s[0]][:, :, s[1]], corrupt_cache["z", s[0]][:, :, s[1]], send_mask)
                 if skip_unchanged else 0 for s in scored}
        order = [i for i, s in enumerate(scored) if first[s] is not None]
        for s in scored:
            if first[s] is None:  # the path carries nothing different: the clean run
                patched[s] = clean_metric
        if skip_unchanged:
            order.sort(key=lambda i: (scored[i][0], -first[scored[i]]))  # by layer, latest first positions first
        comps = [(layer, None, first[(layer, head)] or 0, head) for layer, head in scored]
        chunks = _chunks(order, comps, k, span=max(1, seq // 4) if skip_unchanged else None)
        for chunk_index in tqdm(chunks, desc="path patching", disable=not progress):
            chunk = [scored[i] for i in chunk_index]
            start = min(first[s] for s in chunk) if clean_run.past is not None and skip_unchanged else 0
            values = _score_chunk(model, clean, chunk, receivers, receiver_input, clean_run, corrupt_cache,
                                  send_mask, recv_mask, freeze_mlps, metric, view, owner, start, skip_unchanged)
            for (layer, head), value in zip(chunk, values):
                patched[layer, head] = value

    effect = patched - clean_metric
    if normalize:
        gap = clean_metric - corrupt_metric
        if abs(gap) < 1e-12:
            raise ValueError(f"{owner}: the metric is the same on the clean and the corrupted input; use normalize=False.")
        effect = effect / gap
    return PathPatchingResult(effect, patched, clean_metric, corrupt_metric, receivers, receiver_input)


def _first_change(clean_z: torch.Tensor, corrupt_z: torch.Tensor, send_mask: torch.Tensor) -> int | None:
    """First position where a sender's corrupted output differs from its clean one at a sender position."""
    changed = (clean_z != corrupt_z).flatten(2).any(-1) & send_mask  # [batch, pos]
    where = changed.any(0).nonzero()
    return int(where[0]) if len(where) else None


def _run_from(model, clean_run: _CorruptRun, clean: torch.Tensor, k: int, start: int, first_layer: int, fwd_hooks, view,
              names=None):
    """The clean input repeated ``k`` times, run from position ``start`` (on the clean run's key/value cache) and
    from block ``first_layer`` (on its residual stream), with ``fwd_hooks``; ``(logits of every position,
    cache of names)``."""
    kwargs = {cache_kwarg(model): clean_run.prefix_cache(start, k), "use_cache": True} if start else {}
    resid = clean_run.cache["resid_pre", first_layer][:, start:].repeat(k, 1, 1) if first_layer else None
    with _skipping(clean_run.blocks, first_layer, resid):
        if names is None:
            tail, cache = run_with_hooks(model, clean[:, start:].repeat(k, 1), fwd_hooks=fwd_hooks, view=view, **kwargs), None
        else:
            tail, cache = run_with_cache(model, clean[:, start:].repeat(k, 1), names_filter=names, fwd_hooks=fwd_hooks, view=view, **kwargs)
    logits = torch.cat([clean_run.logits[:, :start].repeat(k, 1, 1), tail], dim=1) if start else tail
    return logits, cache


def _score_chunk(model, clean, chunk, receivers, receiver_input, clean_run, corrupt_cache, send_mask, recv_mask,
                 freeze_mlps, metric, view, owner, start: int, skip: bool) -> list[float]:
    """Steps 2 and 3 for ``len(chunk)`` senders at once, each in its own copy of the clean batch; the passes start
    at position ``start`` (nothing differs before it) and, with ``skip``, at the lowest block that can differ."""
    k, n = len(chunk), clean.shape[0]
    clean_cache = clean_run.cache
    low = min(layer for layer, _ in chunk) if skip and clean_run.blocks is not None else 0
    mask2 = send_mask[:, start:]

    # the receivers' inputs can differ from the clean ones only from `start` on: patched nowhere there, the path
    # carries nothing, and neither step runs
    if receiver_input != "logits":
        changed = recv_mask.clone()
        changed[:, :start] = False
        where = changed.any(0).nonzero()
        if not len(where):
            return [float(call_metric(metric, clean_run.logits, n, owner).mean())] * k

    # step 2: all heads frozen to clean, sender i corrupted at the sender positions in copy i
    def freeze(layer: int):
        senders_here = [(copy, head) for copy, (ly, head) in enumerate(chunk) if ly == layer]
        clean_z, corrupt_z = clean_cache["z", layer][:, start:], corrupt_cache["z", layer][:, start:]  # [n, pos, head, d_head]

        def hook(value, _point):
            v = einops.repeat(clean_z, "n p h d -> k n p h d", k=k).clone()
            for copy, head in senders_here:
                v[copy][:, :, head] = torch.where(mask2[..., None], corrupt_z[:, :, head], clean_z[:, :, head])
            return einops.rearrange(v, "k n p h d -> (k n) p h d")

        return hook

    fwd_hooks = [(act_name("z", layer), freeze(layer)) for layer in range(low, view.n_layers)]
    if freeze_mlps:
        for layer in range(low, view.n_layers):
            frozen = clean_cache["mlp_out", layer][:, start:].repeat(k, 1, 1)
            fwd_hooks.append((act_name("mlp_out", layer), lambda value, point, frozen=frozen: frozen))
    if receiver_input == "logits":
        logits, _ = _run_from(model, clean_run, clean, k, start, low, fwd_hooks, view)
        return [float(call_metric(metric, logits[i * n : (i + 1) * n], n, owner).mean()) for i in range(k)]

    recv_layers = sorted({layer for layer, _ in receivers})
    names = [act_name(receiver_input, layer) for layer in recv_layers]
    _, recorded = _run_from(model, clean_run, clean, k, start, low, fwd_hooks, view, names=names)

    # step 3: clean run with only the receivers' inputs replaced by what step 2 recorded; before `start` the
    # recorded inputs are the clean ones, so the receivers change nothing there
    start3 = int(where[0]) if skip and clean_run.past is not None else 0
    low3 = min(recv_layers) if skip and clean_run.blocks is not None else 0
    group = view.n_heads // view.n_kv_heads if receiver_input in ("k", "v") else 1
    mask = recv_mask[:, start3:].repeat(k, 1)[..., None]  # [k * n, pos, 1]

    def receive(layer: int):
        heads = sorted({head // group for ly, head in receivers if ly == layer})
        record = recorded[receiver_input, layer]  # [k * n, positions from `start`, ...]
        if start3 < start:  # the positions in between hold the clean inputs (start3 = 0 without skipping)
            before = clean_cache[receiver_input, layer][:, start3:start].repeat(k, 1, *[1] * (record.ndim - 2))
            record = torch.cat([before, record], dim=1)
        else:
            record = record[:, start3 - start :]

        def hook(value, _point):
            v = value.clone()
            for head in heads:
                v[:, :, head] = torch.where(mask, record[:, :, head], value[:, :, head])
            return v

        return hook

    # receivers below every sender of the chunk were not run in step 2 (skipped blocks): their inputs are clean
    reached = [ly for ly in recv_layers if ly >= low]
    logits, _ = _run_from(model, clean_run, clean, k, start3, low3, [(act_name(receiver_input, ly), receive(ly)) for ly in reached], view)
    return [float(call_metric(metric, logits[i * n : (i + 1) * n], n, owner).mean()) for i in range(k)]
