"""Argument checks shared by the package, with scikit-learn-style messages.

Every check raises ``ValueError`` or ``TypeError`` whose message names the parameter, its owner, what is
accepted and what was given: "The 'r' parameter of LoRA must be an int in [1, inf). Got 0 instead."
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable


def check_int(value: Any, name: str, owner: str, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]`` (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"The {name!r} parameter of {owner} must be an int. Got {value!r} instead.")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf)" if high is None else f"{high}]"
        raise ValueError(f"The {name!r} parameter of {owner} must be an int in [{lo}, {hi}. Got {value!r} instead.")
    return int(value)


def check_float(
    value: Any,
    name: str,
    owner: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real in the given interval."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"The {name!r} parameter of {owner} must be a real number. Got {value!r} instead.")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        raise ValueError(
            f"The {name!r} parameter of {owner} must be a finite number in {left}{lo}, {hi}{right}. "
            f"Got {value!r} instead."
        )
    return value


def check_bool(value: Any, name: str, owner: str) -> bool:
    """Return ``value`` if it is a bool (a truthy string such as ``"no"`` would otherwise pass silently)."""
    if not isinstance(value, bool):
        raise TypeError(f"The {name!r} parameter of {owner} must be True or False. Got {value!r} instead.")
    return value


def check_option(value: Any, name: str, owner: str, options: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``options``."""
    options = list(options)
    if value not in options:
        raise ValueError(f"The {name!r} parameter of {owner} must be one of {options}. Got {value!r} instead.")
    return value


def check_device(device: Any):
    """``torch.device(device)`` for a device this machine has; ``TypeError``/``ValueError`` naming ``device`` otherwise."""
    import torch

    accepted = "None (the best available), 'cpu', 'cuda', 'cuda:<index>' or 'mps'"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"The 'device' parameter must be {accepted}, or a torch.device. Got {device!r} instead.")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"The 'device' parameter must be {accepted}. Got {device!r} instead.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"The 'device' parameter is {device!r} but no CUDA GPU is available here (torch.cuda.is_available() "
                "is False). Use device='cpu', or None to pick the best available device."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"The 'device' parameter is {device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(indices 0..{torch.cuda.device_count() - 1})."
            )
    return dev
