"""Conventions shared by the notebooks: the scale switch, the header line, and a within-run cache.

Every notebook starts with::

    import ftanalysis as fta
    S = fta.notebook.setup()          # reads FTA_SCALE: "ci" (2 CPU cores, minutes) or "full" (one GPU)
    steps = S.pick(ci=200, full=2000)

``FTA_SCALE`` defaults to ``full`` when CUDA is available and ``ci`` otherwise. The header printed by
``setup`` is the first output of every committed notebook: it says which scale and device produced it.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from typing import Any

import torch

from ._validation import check_bool, check_int

SCALES = ("ci", "full")


@dataclass(frozen=True)
class Scale:
    """The active scale (``"ci"`` or ``"full"``) and the device notebooks should use."""

    name: str
    device: str

    def __post_init__(self):
        if self.name not in SCALES:  # pick() would otherwise treat any other name as "full"
            raise ValueError(f"The 'name' parameter of Scale must be one of {list(SCALES)} (FTA_SCALE). Got {self.name!r} instead.")

    def pick(self, ci: Any, full: Any) -> Any:
        """``ci`` at the small scale, ``full`` at the large one."""
        return ci if self.name == "ci" else full

    @property
    def is_ci(self) -> bool:
        return self.name == "ci"


def current_scale() -> str:
    """``$FTA_SCALE`` if set (``ci`` or ``full``), else ``full`` with CUDA and ``ci`` without."""
    value = os.environ.get("FTA_SCALE")
    if value is None:
        return "full" if torch.cuda.is_available() else "ci"
    if value not in SCALES:
        raise ValueError(
            f"The environment variable FTA_SCALE must be one of {list(SCALES)} (or unset: 'full' with CUDA, else 'ci'). "
            f"Got {value!r}."
        )
    return value


def setup(seed: int = 0, threads: int | None = None, quiet: bool = False) -> Scale:
    """Seed Python and torch, pick the scale and device, and print one header line."""
    from . import __version__
    from .train import choose_device

    check_int(seed, "seed", "fta.notebook.setup")
    if threads is not None:
        check_int(threads, "threads", "fta.notebook.setup", 1)
    check_bool(quiet, "quiet", "fta.notebook.setup")
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    scale = Scale(name=current_scale(), device=str(choose_device()))
    if not quiet:
        name = torch.cuda.get_device_name(0) if scale.device.startswith("cuda") else platform.processor() or platform.machine()
        print(
            f"FTA_SCALE={scale.name} | device={scale.device} ({name}, {torch.get_num_threads()} threads) | "
            f"ftanalysis {__version__} | torch {torch.__version__}"
        )
    return scale
