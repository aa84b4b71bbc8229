"""A small on-disk cache of fine-tuning runs, so notebooks that share a fine-tune train it once per run.

``cached_finetune(key_parts, model, tok, task, method, **kwargs)`` returns the merged model and the history
of ``fta.finetune``. The key is the ``repr`` of everything that determines the result (base model name,
task, method, hyper-parameters, seed), so a changed argument never returns a stale model. Training is
deterministic on CPU, which is what makes reuse within a run honest; the cache lives in ``$FTA_CACHE_DIR``
(default: the platform's cache folder, ``~/.cache/ftanalysis`` on Linux) and ``FTA_CACHE=0`` turns it off.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ._paths import user_cache_dir
from .train import _dedupe_shared, finetune


def cache_dir() -> Path:
    """The folder of cached fine-tunes: :func:`ftanalysis._paths.user_cache_dir`."""
    return user_cache_dir()


def cache_enabled() -> bool:
    return os.environ.get("FTA_CACHE", "1") != "0"


def weights_fingerprint(model) -> str:
    """SHA-256 (first 16 hex digits) of every tensor in ``model.state_dict()``, names and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_finetune(base_name: str, model, tok, task, method, **kwargs):
    """``(merged_model, history)`` of ``finetune(model, tok, task, method, **kwargs)``, from the cache if there.

    The key is ``base_name`` (a readable label, e.g. ``"minilm+head(seed=0)"``), a fingerprint of ``model``'s
    weights (so a retrained base never reuses a stale fine-tune), the task, the method and the arguments.
    """
    kwargs.setdefault("progress", False)
    key_text = json.dumps(
        {
            "base": base_name, "weights": weights_fingerprint(model), "task": repr(task), "method": repr(method),
            **{k: repr(v) for k, v in sorted(kwargs.items()) if k != "progress"},
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    folder = cache_dir() / key
    if cache_enabled() and (folder / "model.safetensors").is_file():
        merged = copy.deepcopy(model)
        missing, unexpected = merged.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if not unexpected and all("lm_head" in k or "embed" in k for k in missing):
            merged.eval()
            return merged, pd.read_csv(folder / "history.csv")
    result = finetune(model, tok, task, method, **kwargs)
    merged = result.merged_model().eval()
    if cache_enabled():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in merged.state_dict().items()}
        save_file(_dedupe_shared(state), str(tmp / "model.safetensors"))
        result.history.to_csv(tmp / "history.csv", index=False)
        (tmp / "key.json").write_text(key_text)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return merged, result.history
