"""Representation similarity between a base and a fine-tuned model: linear CKA per layer.

Kornblith, Norouzi, Lee, Hinton 2019, "Similarity of Neural Network Representations Revisited" (ICML 2019,
arXiv 1905.00414). For representations ``X`` ``[n, d1]`` and ``Y`` ``[n, d2]`` of the same ``n`` inputs,
with every column centred::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

It lies in [0, 1], equals 1 for ``Y = X Q s + c`` (any orthogonal ``Q``, isotropic scale ``s``, offset ``c``),
and is not invariant to general invertible linear maps (unlike CCA), which is why it tracks what fine-tuning
changed in a layer rather than only what is linearly decodable from it.

Representations are read with forward hooks on the canonical blocks (``fta.nn.ModelView``): layer 0 is the
residual stream entering block 0 (the embeddings, ``layers.0.hook_resid_pre``), layer ``l`` (1..L) the
residual stream leaving block ``l - 1`` (``layers.{l-1}.hook_resid_post``). One vector per input: the last
real token (``pooling="last"``, the position that predicts the answer of an LM prompt) or the mean over real
tokens (``"mean"``, as the sentence classifiers pool).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch

from .._validation import check_int, check_option
from ..nn.view import ModelView
from ..tasks.base import Example, Task

POOLINGS = ("last", "mean")


# ---------------------------------------------------------------------- reading representations
def prompts_of(inputs, n: int | None = None, split: str = "test") -> list[str]:
    """Prompts from a Task (its first ``n`` examples of ``split``), a list of Examples, or a list of strings."""
    if isinstance(inputs, Task):
        return [e.prompt for e in inputs.examples(n or 256, split)]
    if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
        raise TypeError(f"Expected a Task, or a non-empty list of prompts or Examples. Got {type(inputs).__name__}.")
    prompts = [e.prompt if isinstance(e, Example) else e for e in inputs]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("Expected a list of prompt strings or Examples.")
    return prompts if n is None else prompts[:n]


def encode(tok, prompts: Sequence[str], device=None) -> dict:
    """Right-padded ``input_ids`` and ``attention_mask`` for a list of prompts (no answers)."""
    rows = [tok(p)["input_ids"] for p in prompts]
    unk = getattr(tok, "unk_token_id", None)
    special = {getattr(tok, f"{k}_token_id", None) for k in ("eos", "bos", "pad")}
    if unk is not None and unk not in special:  # byte-level BPE reuses <|endoftext|> as unk: it never maps words there
        for prompt, row in zip(prompts, rows):
            if unk in row:
                raise ValueError(
                    f"The 'inputs' prompt {prompt!r} has words the tokenizer does not know: it would map them to its "
                    f"unknown token {tok.unk_token!r} and the probe would measure that instead. Use words of the model's "
                    "vocabulary (a Task's prompts always are)."
                )
    if not rows or not all(rows):
        raise ValueError("Every prompt must tokenize to at least one token. Got an empty prompt (or no prompts).")
    length = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[batch, pos, d] -> [batch, d]``: the last real token or the mean over real tokens."""
    if pooling == "last":
        last = attention_mask.sum(1) - 1  # [batch]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def block_output(output):
    """The hidden state of a block's output (HF blocks return a tensor or a tuple starting with it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def residual_hooks(model, store: dict):
    """Record ``store[0]`` (entering block 0) and ``store[l]`` (leaving block l-1) on every forward pass.

    The hooks are removed on exit, even after an exception.
    """
    view = ModelView(model)
    handles = []
    try:
        def pre(_, args, kwargs):
            store[0] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(view.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        for layer, block in enumerate(view.blocks):
            def post(_, __, output, layer=layer):
                store[layer + 1] = block_output(output).detach()

            handles.append(block.register_forward_hook(post))
        yield view
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_representations(model, tok, inputs, n: int | None = None, split: str = "test", pooling: str = "last", batch_size: int = 128) -> torch.Tensor:
    """Pooled residual-stream vectors of every layer, ``[n_layers + 1, n_inputs, d_model]`` float32 on CPU.

    ``inputs``: a Task (its first ``n`` examples of ``split``), a list of Examples or of prompt strings.
    """
    check_option(pooling, "pooling", "layer_representations", POOLINGS)
    check_int(batch_size, "batch_size", "layer_representations", 1)
    prompts = prompts_of(inputs, n, split)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs: list[torch.Tensor] = []
    store: dict[int, torch.Tensor] = {}
    try:
        with residual_hooks(model, store) as view:
            for start in range(0, len(prompts), batch_size):
                batch = encode(tok, prompts[start : start + batch_size], device)
                store.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                pooled = [pool(store[layer].float(), batch["attention_mask"], pooling) for layer in range(view.n_layers + 1)]
                outs.append(torch.stack(pooled).cpu())  # [layers + 1, batch, d_model]
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------- CKA
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same inputs, ``x`` ``[n, d1]`` and ``y`` ``[n, d2]``.

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred float64 copies (Kornblith et al. 2019).
    A representation that is constant over the inputs has no similarity structure: the result is NaN.
    """
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"linear_cka expects two 2-D [n, d] matrices. Got shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same inputs in both (same n). Got {x.shape[0]} and {y.shape[0]} rows.")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 inputs.")
    for name, value in (("x", x), ("y", y)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"The {name!r} parameter of linear_cka has NaN or infinite entries; CKA needs finite representations.")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denom) if float(denom) > 0 else float("nan")


@dataclass
class CKAResult:
    """Linear CKA between two models' representations, one value per layer (0 = embeddings)."""

    cka: list[float]
    pooling: str
    n_inputs: int

    def to_frame(self) -> pd.DataFrame:
        names = ["embeddings"] + [f"block {layer}" for layer in range(len(self.cka) - 1)]
        return pd.DataFrame({"layer": range(len(self.cka)), "name": names, "cka": self.cka})

    def plot(self, ax=None, label: str | None = None):
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 3))
        ax.plot(range(len(self.cka)), self.cka, "o-", label=label)
        ax.set_xticks(range(len(self.cka)), ["emb"] + [str(i) for i in range(len(self.cka) - 1)])
        ax.set_xlabel("layer (residual stream after block)")
        ax.set_ylabel("linear CKA (base vs fine-tuned)")
        ax.set_ylim(0, 1.05)
        if label:
            ax.legend(frameon=False)
        fig.tight_layout()
        return fig


def cka_per_layer(base, finetuned, tok, inputs, n: int | None = 256, split: str = "test", pooling: str = "last", batch_size: int = 128) -> CKAResult:
    """Linear CKA between ``base`` and ``finetuned`` at every layer, on the same inputs.

    Parameters
    ----------
    base, finetuned : models of one architecture (any family ``fta.nn.ModelView`` supports, encoder
        classifiers included). Neither is modified.
    tok : the tokenizer of both.
    inputs : Task, list of Examples or list of prompt strings.
    n : int, default=256
        Inputs drawn from a Task (and the cap on a list).
    pooling : {"last", "mean"}, default="last"
        One vector per input: the last real token, or the mean over real tokens.
    """
    rep_base = layer_representations(base, tok, inputs, n, split, pooling, batch_size)
    rep_ft = layer_representations(finetuned, tok, inputs, n, split, pooling, batch_size)
    if rep_base.shape[0] != rep_ft.shape[0]:
        raise ValueError(f"The two models have different numbers of layers: {rep_base.shape[0] - 1} and {rep_ft.shape[0] - 1}.")
    values = [linear_cka(a, b) for a, b in zip(rep_base, rep_ft)]
    return CKAResult(cka=values, pooling=pooling, n_inputs=rep_base.shape[1])
