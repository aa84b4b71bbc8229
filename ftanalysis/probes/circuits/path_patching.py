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
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..._validation import check_int, check_option
from ._common import Head, as_ids, call_metric, check_heads, check_pair, model_device, position_mask
from .hooks import _view, act_name, run_with_cache, run_with_hooks
from .patching import eval_mode

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
    with eval_mode(model), torch.no_grad():
        clean_logits, clean_cache = run_with_cache(model, clean, names_filter=z_names + mlp_names)
        corrupt_logits, corrupt_cache = run_with_cache(model, corrupt, names_filter=z_names)
        clean_metric = float(call_metric(metric, clean_logits, n, owner).mean())
        corrupt_metric = float(call_metric(metric, corrupt_logits, n, owner).mean())

        # senders at or above the deepest receiver cannot reach it: they keep NaN
        scored = [s for s in senders if s[0] < deepest]
        patched = torch.full((view.n_layers, view.n_heads), float("nan"))
        k = max(1, batch_size // n)
        for start in tqdm(range(0, len(scored), k), desc="path patching", disable=not progress):
            chunk = scored[start : start + k]
            values = _score_chunk(model, clean, chunk, receivers, receiver_input, clean_cache, corrupt_cache,
                                  send_mask, recv_mask, freeze_mlps, metric, view, owner)
            for (layer, head), value in zip(chunk, values):
                patched[layer, head] = value

    effect = patched - clean_metric
    if normalize:
        gap = clean_metric - corrupt_metric
        if abs(gap) < 1e-12:
            raise ValueError(f"{owner}: the metric is the same on the clean and the corrupted input; use normalize=False.")
        effect = effect / gap
    return PathPatchingResult(effect, patched, clean_metric, corrupt_metric, receivers, receiver_input)


def _score_chunk(model, clean, chunk, receivers, receiver_input, clean_cache, corrupt_cache, send_mask, recv_mask,
                 freeze_mlps, metric, view, owner) -> list[float]:
    k, n = len(chunk), clean.shape[0]
    inputs = clean.repeat(k, 1)  # copy-major: rows [i * n, (i + 1) * n) are copy i

    # step 2: all heads frozen to clean, sender i corrupted at the sender positions in copy i
    def freeze(layer: int):
        senders_here = [(copy, head) for copy, (ly, head) in enumerate(chunk) if ly == layer]
        clean_z, corrupt_z = clean_cache["z", layer], corrupt_cache["z", layer]  # [n, pos, head, d_head]

        def hook(value, _point):
            v = einops.repeat(clean_z, "n p h d -> k n p h d", k=k).clone()
            for copy, head in senders_here:
                v[copy][:, :, head] = torch.where(send_mask[..., None], corrupt_z[:, :, head], clean_z[:, :, head])
            return einops.rearrange(v, "k n p h d -> (k n) p h d")

        return hook

    fwd_hooks = [(act_name("z", layer), freeze(layer)) for layer in range(view.n_layers)]
    if freeze_mlps:
        for layer in range(view.n_layers):
            frozen = clean_cache["mlp_out", layer].repeat(k, 1, 1)
            fwd_hooks.append((act_name("mlp_out", layer), lambda value, point, frozen=frozen: frozen))
    if receiver_input == "logits":
        logits = run_with_hooks(model, inputs, fwd_hooks=fwd_hooks, view=view)
        return [float(call_metric(metric, logits[i * n : (i + 1) * n], n, owner).mean()) for i in range(k)]

    recv_layers = sorted({layer for layer, _ in receivers})
    names = [act_name(receiver_input, layer) for layer in recv_layers]
    _, recorded = run_with_cache(model, inputs, names_filter=names, fwd_hooks=fwd_hooks, view=view)

    # step 3: clean run with only the receivers' inputs replaced by what step 2 recorded
    group = view.n_heads // view.n_kv_heads if receiver_input in ("k", "v") else 1
    mask = recv_mask.repeat(k, 1)[..., None]  # [k * n, pos, 1]

    def receive(layer: int):
        heads = sorted({head // group for ly, head in receivers if ly == layer})
        record = recorded[receiver_input, layer]

        def hook(value, _point):
            v = value.clone()
            for head in heads:
                v[:, :, head] = torch.where(mask, record[:, :, head], value[:, :, head])
            return v

        return hook

    logits = run_with_hooks(model, inputs, fwd_hooks=[(act_name(receiver_input, ly), receive(ly)) for ly in recv_layers], view=view)
    return [float(call_metric(metric, logits[i * n : (i + 1) * n], n, owner).mean()) for i in range(k)]
