"""Desiderata-based component masking (DCM): which heads of a group carry a stated kind of information?

Davies, Jiang, Dempsey, Foerster, Nanda and Kenton 2023, "Discovering Variable Binding Circuitry with
Desiderata" (arXiv 2307.03637); used by Prakash et al. 2024, "Fine-Tuning Enhances Existing Mechanisms"
(arXiv 2402.14811, ``experiment_2/DCM.py``).

A *desideratum* is a set of (base, source, target) triples: patching the information in question from the
source run into the base run should make the model output ``target``. For entity tracking, with the
source's query at a different box index than the base's: *positional* -> target = the base context's object
at the source's query index; *object value* -> target = the source's answer object. A binary mask over the
group's heads is learned with a continuous relaxation:

    z_h := m_h * z_h(base) + (1 - m_h) * z_h(source)        (m_h in [0, 1]; 0 = patch from source)
    loss = -mean_i logit_i[target_i] + lam * sum_h (1 - m_h)

Adam (lr 0.1), ``m`` initialised to 1 and clamped to [0, 1] after every step; at evaluation ``m`` is rounded
(heads with ``m_h < 0.5`` are patched) and the mask with the best validation accuracy (the fraction of
outputs equal to the target) is kept. Defaults follow Prakash et al.'s code (lam 0.01, lr 0.1, 2 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..._validation import check_float, check_int
from ...stats import wilson_interval
from ._common import Head, as_ids, check_heads, last_token_accuracy, model_device
from .hooks import _forward, _view, act_name, hooks, run_with_cache
from .patching import eval_mode


@dataclass
class DCMResult:
    """A learned head mask for one group and one desideratum.

    ``mask_`` holds the learned continuous values (1 = keep base, 0 = patch from source); ``selected_`` the
    heads whose rounded mask patches them. Accuracies are the fraction of test outputs equal to the
    desideratum's target: with the rounded mask, with the whole group patched, and with nothing patched.
    """

    heads: list[Head]
    mask_: torch.Tensor
    selected_: list[Head]
    accuracy: float
    accuracy_ci: tuple[float, float]
    all_heads_accuracy: float
    no_patch_accuracy: float
    n_test: int
    history: list[dict] = field(default_factory=list, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"layer": layer, "head": head, "mask": float(m), "selected": (layer, head) in self.selected_}
                             for (layer, head), m in zip(self.heads, self.mask_)])


def _gather(z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``z[b, positions[b]]`` for every example: ``[batch, pos, head, d] -> [batch, head, d]``."""
    return z[torch.arange(z.shape[0], device=z.device), positions]


def _patched_logits(model, base, source_z, heads, mask, base_pos, layers) -> torch.Tensor:
    """Logits of ``base`` with each head ``(l, h)`` at ``base_pos`` set to ``m * z_base + (1 - m) * z_source``."""
    index = {layer: [(i, h) for i, (ly, h) in enumerate(heads) if ly == layer] for layer in layers}
    rows = torch.arange(base.shape[0], device=base.device)

    def mix(layer):
        def hook(value, _point):
            v = value.clone()
            for i, head in index[layer]:
                own = value[rows, base_pos, head]  # [batch, d_head]
                v[rows, base_pos, head] = mask[i] * own + (1 - mask[i]) * source_z[layer][:, head]
            return v

        return hook

    with hooks(model, fwd_hooks=[(act_name("z", layer), mix(layer)) for layer in layers]):
        return _forward(model, base)


def dcm(
    model: torch.nn.Module,
    base_ids: torch.Tensor,
    source_ids: torch.Tensor,
    target_ids: torch.Tensor,
    heads: list[Head],
    base_positions,
    source_positions=None,
    *,
    lam: float = 0.01,
    lr: float = 0.1,
    epochs: int = 2,
    batch_size: int = 32,
    split: tuple[float, float, float] = (0.5, 0.25, 0.25),
    seed: int = 0,
    progress: bool = False,
) -> DCMResult:
    """Learn which heads of ``heads`` carry the information a desideratum names.

    Parameters
    ----------
    model : nn.Module
        GPT-2 or Llama-family causal LM (not modified).
    base_ids, source_ids : LongTensor ``[batch, pos]``
        Paired prompts; the answer is read at the base's last position.
    target_ids : LongTensor ``[batch]``
        The token the desideratum predicts when the information moves from source to base.
    heads : list of (layer, head)
        The head group to mask.
    base_positions : int or LongTensor ``[batch]``
        Where the group acts in the base prompt (one position per example).
    source_positions : int or LongTensor ``[batch]``, optional
        Where to read the source activations (default: ``base_positions``).
    lam : float, default=0.01
        L1 pressure towards patching few heads.
    lr, epochs, batch_size : float, int, int, default=0.1, 2, 32
        Adam learning rate, passes over the training split, examples per step.
    split : (float, float, float), default=(0.5, 0.25, 0.25)
        Train / validation / test fractions (a seeded permutation of the examples).
    seed : int, default=0

    Returns
    -------
    DCMResult
    """
    owner = "dcm"
    check_float(lam, "lam", owner, 0.0)
    check_float(lr, "lr", owner, 0.0, low_open=True)
    check_int(epochs, "epochs", owner, 1)
    check_int(batch_size, "batch_size", owner, 1)
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"The 'split' parameter of {owner} must be three positive fractions summing to 1. Got {split!r}.")
    view = _view(model)
    device = model_device(model)
    base = as_ids(base_ids, "base_ids", owner, device, model=model)
    source = as_ids(source_ids, "source_ids", owner, device, model=model)
    targets = torch.as_tensor(target_ids).long().to(device)
    n = base.shape[0]
    if source.shape[0] != n or targets.shape != (n,):
        raise ValueError(f"{owner}: base_ids, source_ids and target_ids need one row per example ({n}). Got {source.shape[0]} and {tuple(targets.shape)}.")
    heads = check_heads(heads, view, owner)
    if not heads:
        raise ValueError(f"The 'heads' parameter of {owner} must name at least one (layer, head).")

    def positions(spec, ids, name):
        pos = torch.full((n,), spec, dtype=torch.long) if isinstance(spec, int) else torch.as_tensor(spec).long()
        if pos.shape != (n,) or (pos < -ids.shape[1]).any() or (pos >= ids.shape[1]).any():
            raise ValueError(f"{owner}: {name!r} must be an int or a [batch] tensor of positions within {ids.shape[1]}. Got {spec!r}.")
        return (pos % ids.shape[1]).to(device)

    base_pos = positions(base_positions, base, "base_positions")
    source_pos = positions(base_positions if source_positions is None else source_positions, source, "source_positions")
    layers = sorted({layer for layer, _ in heads})

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(device)
    n_train, n_val = int(split[0] * n), int(split[1] * n)
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    if min(len(p) for p in parts.values()) == 0:
        raise ValueError(f"{owner}: {n} examples are too few for the split {split}.")

    with eval_mode(model):
        with torch.no_grad():
            _, cache = run_with_cache(model, source, names_filter=[act_name("z", layer) for layer in layers])
            source_z = {layer: _gather(cache["z", layer], source_pos) for layer in layers}  # [batch, head, d_head]

        def rate(idx, mask) -> tuple[int, int]:
            with torch.no_grad():
                logits = _patched_logits(model, base[idx], {ly: z[idx] for ly, z in source_z.items()}, heads, mask, base_pos[idx], layers)
            return int(last_token_accuracy(logits, targets[idx]).sum()), len(idx)

        mask = torch.ones(len(heads), device=device, requires_grad=True)
        optimizer = torch.optim.Adam([mask], lr=lr)
        best = (-1.0, mask.detach().round().clone())
        history = []
        train = parts["train"]
        steps = [(epoch, start) for epoch in range(epochs) for start in range(0, len(train), batch_size)]
        for epoch, start in tqdm(steps, desc="dcm", disable=not progress):
            if start == 0:
                train = parts["train"][torch.randperm(len(parts["train"]), generator=generator).to(device)]
            idx = train[start : start + batch_size]
            with torch.enable_grad():
                logits = _patched_logits(model, base[idx], {ly: z[idx] for ly, z in source_z.items()}, heads, mask, base_pos[idx], layers)
                picked = logits[:, -1].float().gather(1, targets[idx][:, None]).squeeze(1)
                loss = -picked.mean() + lam * (1 - mask).sum()
                (grad,) = torch.autograd.grad(loss, [mask])
            optimizer.zero_grad()
            mask.grad = grad
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
            last_step = start + batch_size >= len(train)
            if last_step:
                hits, total = rate(parts["val"], mask.detach().round())
                history.append({"epoch": epoch, "loss": float(loss.detach()), "val_accuracy": hits / total})
                if hits / total > best[0]:
                    best = (hits / total, mask.detach().round().clone())

        chosen = best[1]
        test = parts["test"]
        hits, total = rate(test, chosen)
        all_hits, _ = rate(test, torch.zeros(len(heads), device=device))
        none_hits, _ = rate(test, torch.ones(len(heads), device=device))
    return DCMResult(
        heads=heads,
        mask_=mask.detach().cpu(),
        selected_=[h for h, m in zip(heads, chosen.tolist()) if m < 0.5],
        accuracy=hits / total,
        accuracy_ci=wilson_interval(hits, total),
        all_heads_accuracy=all_hits / total,
        no_patch_accuracy=none_hits / total,
        n_test=total,
        history=history,
    )
