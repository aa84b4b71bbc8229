"""The key/value cache argument of a Hugging Face forward pass, under the name the installed transformers uses.

transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name still works but warns on every call,
for every model). Callers that run cached forward passes ask here for the name the model's ``forward`` takes
and read the cache back from its output, so patching and generation stay quiet on old and new versions alike.
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """``"cache"`` if ``model.forward`` takes it (transformers >= 5.x), else ``"past_key_values"``."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(out):
    """The key/value cache a forward pass returned (``out.cache`` or, on older versions, ``out.past_key_values``)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    if "cache" in keys:
        return out["cache"]
    if "past_key_values" in keys:
        return out["past_key_values"]
    return None
