"""A small on-disk cache of fine-tuning runs, so notebooks that share a fine-tune train it once per run.

``cached_finetune(key_parts, model, tok, task, method, **kwargs)`` returns the merged model and the history
of ``fta.finetune``. The key is the ``repr`` of everything that determines the result (base model name,
task, method, hyper-parameters, seed), a fingerprint of the base weights, the package version and a digest
of the package's own training code (:func:`training_code_digest`), so neither a changed argument nor a
changed training loop ever returns a stale model. Training is deterministic on CPU, which is what makes
reuse within a run honest; the cache lives in ``$FTA_CACHE_DIR`` (default: the platform's cache folder,
``~/.cache/ftanalysis`` on Linux) and ``FTA_CACHE=0`` turns it off. Each call logs, on the
``ftanalysis.cache`` logger, whether the result was trained or loaded from the cache
(``fta.notebook.setup`` shows these lines in a notebook's output).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ._paths import user_cache_dir
from .train import _dedupe_shared, finetune

logger = logging.getLogger(__name__)

#: The parts of the package whose code decides what a fine-tune returns (relative to the package folder):
#: the training loop, the methods, the model classes and views, the tasks and their data.
TRAINING_CODE = ("train.py", "cache.py", "_validation.py", "methods", "nn", "tasks", "zoo")


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


@functools.lru_cache(maxsize=1)
def training_code_digest() -> str:
    """SHA-256 (first 16 hex digits) of the source and data files in :data:`TRAINING_CODE`, by relative path.

    Part of every cache key: editing the training loop, a method, a model class or a task makes the cache
    train again instead of serving a result of the old code.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = root / entry
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and file.suffix in (".py", ".json") and "__pycache__" not in file.parts:
                digest.update(file.relative_to(root).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def run_description(base_name: str, model, task, method, kwargs: dict) -> dict[str, str]:
    """What determines a fine-tune's result, as text: the base (label and weight fingerprint), task, method and
    ``finetune``'s arguments (``progress`` left out)."""
    return {
        "base": base_name, "weights": weights_fingerprint(model), "task": repr(task), "method": repr(method),
        **{k: repr(v) for k, v in sorted(kwargs.items()) if k != "progress"},
    }


def run_label(base_name: str, task, method, kwargs: dict) -> str:
    """A short name of a run for log lines."""
    return f"{base_name} | {getattr(task, 'name', type(task).__name__)} | {type(method).__name__} | seed={kwargs.get('seed')}"


def cached_finetune(base_name: str, model, tok, task, method, **kwargs):
    """``(merged_model, history)`` of ``finetune(model, tok, task, method, **kwargs)``, from the cache if there.

    The key is ``base_name`` (a readable label, e.g. ``"minilm+head(seed=0)"``), a fingerprint of ``model``'s
    weights (so a retrained base never reuses a stale fine-tune), the task, the method, the arguments, the
    package version and :func:`training_code_digest`. One line on the ``ftanalysis.cache`` logger says
    whether the result was loaded or trained.
    """
    from . import __version__

    kwargs.setdefault("progress", False)
    key_text = json.dumps(
        {**run_description(base_name, model, task, method, kwargs), "ftanalysis": __version__, "code": training_code_digest()},
        sort_keys=True,
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    folder = cache_dir() / key
    label = run_label(base_name, task, method, kwargs)
    if cache_enabled() and (folder / "model.safetensors").is_file():
        merged = copy.deepcopy(model)
        missing, unexpected = merged.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if not unexpected and all("lm_head" in k or "embed" in k for k in missing):
            merged.eval()
            logger.info("fine-tune %s: loaded from the cache (%s)", label, key)
            return merged, pd.read_csv(folder / "history.csv")
    start = time.perf_counter()
    result = finetune(model, tok, task, method, **kwargs)
    merged = result.merged_model().eval()
    logger.info("fine-tune %s: trained in %.1f s%s", label, time.perf_counter() - start, f" (cached as {key})" if cache_enabled() else "")
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
