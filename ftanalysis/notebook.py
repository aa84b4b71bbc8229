"""Conventions shared by the notebooks: the scale switch, the header line, and a within-run cache.

Every notebook starts with::

    import ftanalysis as fta
    S = fta.notebook.setup()          # reads FTA_SCALE: "ci" (2 CPU cores, minutes) or "full" (one GPU)
    steps = S.pick(ci=200, full=2000)

``FTA_SCALE`` defaults to ``full`` when CUDA is available and ``ci`` otherwise. The header printed by
``setup`` is the first output of every committed notebook: it says which scale and device produced it.
``setup`` also prints the ``ftanalysis.cache`` log lines, so the output says which fine-tunes were trained
and which were loaded from the cache.
"""

from __future__ import annotations

import logging
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path
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


class _PrintHandler(logging.Handler):
    """Writes each record with ``print``, so in a notebook it lands in the output of the running cell."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record))


def show_cache_log(show: bool = True) -> None:
    """Print (or stop printing) the ``ftanalysis.cache`` lines: which fine-tunes were trained or loaded."""
    cache_logger = logging.getLogger("ftanalysis.cache")
    for handler in [h for h in cache_logger.handlers if isinstance(h, _PrintHandler)]:
        cache_logger.removeHandler(handler)
    if show:
        cache_logger.addHandler(_PrintHandler())
        cache_logger.setLevel(logging.INFO)
        cache_logger.propagate = False
    else:
        cache_logger.propagate = True


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else :func:`platform.processor` or the machine type.

    Part of a notebook's header: on a tiny model another CPU rounds the matrix products differently, the
    training runs part ways, and the numbers of a notebook move with the machine that produced them.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    """Seed Python and torch, pick the scale and device, and print one header line.

    Unless ``quiet``, the cache's log lines are printed from then on (:func:`show_cache_log`).
    """
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
        name = torch.cuda.get_device_name(0) if scale.device.startswith("cuda") else cpu_name()
        print(
            f"FTA_SCALE={scale.name} | device={scale.device} ({name}, {torch.get_num_threads()} threads) | "
            f"ftanalysis {__version__} | torch {torch.__version__}"
        )
        show_cache_log()
    return scale
