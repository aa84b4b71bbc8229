"""Ship a fine-tune as its trained parameters only, and load it back bit for bit.

A LoRA fine-tune of MiniLM with a new classification head merges into a 90 MB model, but what training changed
is a few MB: the LoRA factors and the head. PEFT's adapter format cannot carry a head of the package's own
model classes (``export_peft`` refuses it), so the notebooks' shipped MiniLM runs use this format instead:

- ``trained.safetensors``: every parameter that had ``requires_grad`` at the end of training, by its name in
  the method-wrapped model (``...query.lora_A``, ``head.weight``, ...), in float32;
- ``history.csv``: the training history;
- ``card.json``: the method's ``repr``, the base's weight fingerprint, the recipe, the seconds it took, what it
  measured, and the command that rebuilds it.

Loading re-applies the same method to a copy of the same base, writes the saved parameters into it and merges
with the method's own ``merge``: the same operations, on the same numbers, as ``FinetuneResult.merged_model``
of the original run, so the merged weights are identical (``tests/test_trained_parameters.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..cache import cached_finetune, run_description, run_label, weights_fingerprint

WEIGHTS, HISTORY, CARD = "trained.safetensors", "history.csv", "card.json"
logger = logging.getLogger("ftanalysis.cache")  # the logger whose lines fta.notebook.setup shows


def save_trained(result, base, folder: str | Path, card: dict) -> Path:
    """Write ``result``'s trained parameters, history and ``card`` (plus the method and base fingerprint) to ``folder``.

    ``base`` is the model the run started from (its fingerprint goes into the card, so a load onto another base is
    refused). ``card["run"]``, when given, is the run's :func:`~ftanalysis.cache.run_description`, which
    :func:`shipped_or_cached_finetune` matches. The folder is written beside its final place and renamed into
    it: never left half-written.
    """
    trained = {name: p.detach().float().contiguous().cpu() for name, p in result.model.named_parameters() if p.requires_grad}
    if not trained:
        raise ValueError(f"save_trained: the run's model has no trainable parameters left (method {result.method!r}).")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trained, str(tmp / WEIGHTS), metadata={"format": "pt"})
    result.history.to_csv(tmp / HISTORY, index=False)
    full_card = {**card, "method": repr(result.method), "base_weights": weights_fingerprint(base),
                 "trained_parameters": sum(t.numel() for t in trained.values())}
    (tmp / CARD).write_text(json.dumps(full_card, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def read_card(folder: str | Path) -> dict:
    path = Path(folder) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"No shipped fine-tune in {folder}: {CARD} is missing.")
    return json.loads(path.read_text())


def load_trained(folder: str | Path, base, method) -> tuple[torch.nn.Module, pd.DataFrame, dict]:
    """``(merged_model, history, card)``: ``method`` re-applied to a copy of ``base`` with the saved parameters, merged.

    ``method`` must be configured as in the saved run and ``base`` must be the model that run started from;
    otherwise a ``ValueError`` says which differs.
    """
    folder = Path(folder)
    card = read_card(folder)
    if card["method"] != repr(method):
        raise ValueError(f"load_trained: {folder.name} was trained with {card['method']}, not {method!r}.")
    fingerprint = weights_fingerprint(base)
    if card["base_weights"] != fingerprint:
        raise ValueError(f"load_trained: {folder.name} was trained from a base with weight fingerprint "
                         f"{card['base_weights']}; the base given has {fingerprint}.")
    trained = load_file(str(folder / WEIGHTS))
    model = method.apply(base, copy=True)
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise ValueError(f"load_trained: {folder.name} holds parameters the wrapped model lacks: {unknown[:5]}.")
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    return method.merge(model, copy=True).eval(), pd.read_csv(folder / HISTORY), card


def shipped_or_cached_finetune(base_name: str, model, tok, task, method, *, shipped: str | Path, **kwargs):
    """``(merged_model, history)``: a fine-tune shipped in ``shipped`` if one has exactly this description, else
    :func:`ftanalysis.cached_finetune` (which trains, or loads the user's cache).

    The description (:func:`~ftanalysis.cache.run_description`: base label and weight fingerprint, task, method,
    ``finetune``'s arguments) must equal the one in a shipped card: a notebook that changes a recipe, or runs
    at another scale, trains instead of loading something else. One line on the ``ftanalysis.cache`` logger
    says which happened.
    """
    kwargs.setdefault("progress", False)
    description = run_description(base_name, model, task, method, kwargs)
    root = Path(shipped)
    for card_path in sorted(root.glob(f"*/{CARD}")) if root.is_dir() else []:
        if json.loads(card_path.read_text()).get("run") == description:
            merged, history, _ = load_trained(card_path.parent, model, method)
            logger.info("fine-tune %s: loaded the shipped %s", run_label(base_name, task, method, kwargs), card_path.parent.name)
            return merged, history
    return cached_finetune(base_name, model, tok, task, method, **kwargs)
