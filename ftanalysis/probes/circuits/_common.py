"""Argument checks and small helpers shared by the circuit probes (token ids, positions, heads, metrics)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...nn.view import ModelView

Head = tuple[int, int]  # (layer, head)


def vocab_size_of(model) -> int | None:
    """Rows of the model's input embedding (the ids it can read), or None when it has none to ask."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def as_ids(ids, name: str, owner: str, device=None, model=None) -> torch.Tensor:
    """Token ids as a ``[batch, pos]`` long tensor (a 1-D sequence becomes a batch of one).

    With ``model``, every id is checked against its vocabulary up front (an id out of range would otherwise be an
    ``IndexError`` deep inside the embedding, or a device-side assert on a GPU).
    """
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError) as error:
            raise TypeError(f"The {name!r} parameter of {owner} must be a tensor of token ids. Got {type(ids).__name__}.") from error
    if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"The {name!r} parameter of {owner} must hold integer token ids. Got dtype {ids.dtype}.")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"The {name!r} parameter of {owner} must have shape [batch, pos]. Got {tuple(ids.shape)}.")
    ids = ids.long()
    vocab = vocab_size_of(model) if model is not None else None
    if vocab is not None and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"The {name!r} parameter of {owner} holds the token id {bad}, outside the model's vocabulary "
                f"[0, {vocab - 1}] ({vocab} tokens). Encode the prompts with this model's tokenizer."
            )
    return ids.to(device) if device is not None else ids


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_pair(clean: torch.Tensor, corrupt: torch.Tensor, owner: str, aligned: bool = False) -> None:
    """Clean and corrupt inputs need the same batch size, and the same length unless positions are aligned."""
    if clean.shape[0] != corrupt.shape[0]:
        raise ValueError(
            f"{owner}: 'clean_ids' and 'corrupt_ids' must have the same batch size (one corrupt prompt per clean "
            f"prompt). Got {clean.shape[0]} and {corrupt.shape[0]}."
        )
    if not aligned and clean.shape[1] != corrupt.shape[1]:
        raise ValueError(
            f"{owner}: 'clean_ids' has {clean.shape[1]} positions but 'corrupt_ids' has {corrupt.shape[1]}. Use token "
            "sequences of the same length, or align them explicitly with positions=[(clean_pos, corrupt_pos), ...]."
        )


def check_layers(layers, view: ModelView, owner: str) -> list[int]:
    """Layer indices (all when ``None``), each checked against the model's depth."""
    if layers is None:
        return list(range(view.n_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < view.n_layers:
            raise ValueError(f"{owner}: layer {layer!r} is out of range for a model with {view.n_layers} layers (0..{view.n_layers - 1}).")
    return layers


def check_head_indices(heads, n_heads: int, owner: str, kind: str = "heads") -> list[int]:
    """Head indices in ``range(n_heads)`` (all of them for None); ``kind`` names them in the error."""
    if heads is None:
        return list(range(n_heads))
    heads = [heads] if isinstance(heads, int) else list(heads)
    for head in heads:
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
            raise ValueError(f"{owner}: head {head!r} is out of range for {n_heads} {kind} per layer (0..{n_heads - 1}).")
    return heads


def check_heads(heads: Sequence[Head], view: ModelView, owner: str, name: str = "heads") -> list[Head]:
    """A list of ``(layer, head)`` pairs, each in range."""
    out = []
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"The {name!r} parameter of {owner} must be a list of (layer, head) pairs. Got {item!r}.")
        layer, head = item
        check_layers([layer], view, owner)
        check_head_indices([head], view.n_heads, owner)
        out.append((int(layer), int(head)))
    return out


def position_mask(positions, n: int, seq_len: int, owner: str, name: str = "positions", device=None) -> torch.Tensor:
    """A ``[batch, pos]`` boolean mask from a position spec.

    ``None`` (every position), an int or a list of ints (the same positions in every example; negative
    ints count from the end), a ``[batch]`` or ``[batch, k]`` long tensor (per-example positions), or a
    ``[batch, pos]`` boolean mask.
    """
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    if positions is None:
        mask[:] = True
    elif isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (n, seq_len):
            raise ValueError(f"{owner}: a boolean {name!r} mask must have shape (batch, pos) = {(n, seq_len)}. Got {tuple(positions.shape)}.")
        mask = positions.cpu().clone()
    elif isinstance(positions, torch.Tensor):
        index = positions.long().cpu()
        if index.ndim == 1:
            index = index[:, None]
        if index.ndim != 2 or index.shape[0] != n:
            raise ValueError(f"{owner}: per-example {name!r} must have shape [batch] or [batch, k] with batch={n}. Got {tuple(positions.shape)}.")
        if (index < -seq_len).any() or (index >= seq_len).any():
            raise ValueError(f"{owner}: {name!r} holds a position out of range for sequences of length {seq_len}.")
        mask.scatter_(1, index % seq_len, True)
    else:
        values = [positions] if isinstance(positions, int) else list(positions)
        for p in values:
            if isinstance(p, bool) or not isinstance(p, int) or not -seq_len <= p < seq_len:
                raise ValueError(f"{owner}: position {p!r} in {name!r} is out of range for sequences of length {seq_len}.")
            mask[:, p % seq_len] = True
    return mask.to(device) if device is not None else mask


def call_metric(metric: Callable, logits: torch.Tensor, n: int, owner: str) -> torch.Tensor:
    """``metric(logits)`` checked to be one finite scalar per example: a tensor of shape ``(n,)``."""
    if not callable(metric):
        raise TypeError(
            f"The 'metric' parameter of {owner} must be a callable logits [batch, pos, vocab] -> [batch], e.g. "
            f"fta.probes.circuits.logit_diff(answer_ids, wrong_ids). Got {metric!r}."
        )
    value = metric(logits)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"The 'metric' passed to {owner} must return a torch tensor with one scalar per example, shape ({n},). "
            f"Got {type(value).__name__}."
        )
    if tuple(value.shape) != (n,):
        raise ValueError(
            f"The 'metric' passed to {owner} must return one scalar per example: a tensor of shape ({n},). "
            f"Got shape {tuple(value.shape)}."
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"The 'metric' passed to {owner} returned NaN or infinite values ({value.tolist()[:4]}...); effects would be NaN.")
    return value.float()


def last_token_accuracy(logits: torch.Tensor, answer_ids: torch.Tensor, position: int = -1) -> torch.Tensor:
    """``[batch]`` booleans: the argmax of the logits at ``position`` is the answer token."""
    return logits[:, position].argmax(-1) == answer_ids.to(logits.device)


def rank(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1 = smallest) of a 1-D tensor, ties sharing their mean rank."""
    values = values.double().flatten()
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    if len(unique) < len(values):  # average the ranks of ties
        sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (Pearson correlation of their ranks)."""
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs tensors of the same size. Got {a.numel()} and {b.numel()}.")
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")
