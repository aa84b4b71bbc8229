"""Peak memory of a callable, on CUDA and on CPU.

- **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the exact peak of tensor
  memory (what MeZO's paper reports). Caching-allocator slack and the CUDA context are not counted.
- **CPU**: the peak resident set size of the process (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the call), minus the resident size just before it. This is what the
  operating system sees and what runs out; it counts every allocation (tensors, Python objects,
  allocator slack). We chose it over ``torch.profiler(profile_memory=True)``, which records the CPU
  allocator's events but has no peak counter (the peak must be replayed from every event, slowly, through
  the profiler's private memory-timeline API) and multiplies the run time. The cost of RSS: memory that the
  C allocator keeps after earlier work may be reused by the call and go unseen, so ``isolate=True`` runs the
  callable in a fresh Python process (it must then be a picklable, module-level function, and so must its
  arguments and result). Without ``/proc`` (macOS, Windows) the CPU measurement needs ``isolate=True`` and
  uses ``resource.getrusage``'s ``ru_maxrss``.

>>> from ftanalysis.memory import peak_memory
>>> import torch
>>> peak_memory(lambda: torch.ones(2**24).sum(), device="cpu").peak_bytes > 2**25  # a 64 MiB tensor
True
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import queue as queue_module
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class MemoryResult:
    """Peak memory of one call.

    Attributes
    ----------
    peak_bytes : int
        Peak memory during the call above the level just before it (CUDA: tensor memory; CPU: resident set).
    baseline_bytes : int
        Memory in use just before the call (CUDA: allocated tensors; CPU: the process's resident set).
    device : str
    backend : str
        How it was measured: ``"cuda max_memory_allocated"``, ``"linux VmHWM"`` or ``"ru_maxrss (subprocess)"``.
    seconds : float
        Wall time of the call.
    result : Any
        What the callable returned.
    """

    peak_bytes: int
    baseline_bytes: int
    device: str
    backend: str
    seconds: float
    result: Any = None

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def to_dict(self) -> dict:
        return {"peak_mib": round(self.peak_mib, 2), "baseline_mib": round(self.baseline_bytes / 2**20, 2),
                "device": self.device, "backend": self.backend, "seconds": round(self.seconds, 3)}


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {_STATUS}.")


def _release_free_memory() -> None:
    """Collect garbage and hand freed C-heap memory back to the OS (glibc ``malloc_trim``), where possible."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _linux_rss_supported() -> bool:
    return _CLEAR_REFS.exists() and _STATUS.exists() and os.access(_CLEAR_REFS, os.W_OK)


def _cpu_peak_in_process(fn: Callable, args: tuple, kwargs: dict) -> MemoryResult:
    _release_free_memory()
    baseline = _status_kib("VmRSS") * 1024
    _CLEAR_REFS.write_text("5")  # reset the peak resident set size (VmHWM) to the current one
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    return MemoryResult(max(0, peak - baseline), baseline, "cpu", "linux VmHWM", seconds, result)


def _child(queue, fn, args, kwargs) -> None:  # runs in the fresh process
    try:
        if _linux_rss_supported():
            queue.put(("ok", _cpu_peak_in_process(fn, args, kwargs)))
        else:
            import resource

            _release_free_memory()
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            queue.put(("ok", MemoryResult(max(0, peak - before), before, "cpu", "ru_maxrss (subprocess)", seconds, result)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def peak_memory(fn: Callable, *args, device: str | torch.device | None = None, isolate: bool = False, **kwargs) -> MemoryResult:
    """Run ``fn(*args, **kwargs)`` once and return its peak memory as a :class:`MemoryResult`.

    Parameters
    ----------
    fn : callable
        The work to measure. For a comparison that includes the model's weights, build the model inside ``fn``.
    device : str or torch.device, optional
        ``"cuda"`` (or ``"cuda:i"``) measures CUDA tensor memory; ``"cpu"`` the process's resident set.
        Default: CUDA if available, else CPU.
    isolate : bool, default=False
        CPU only: run ``fn`` in a fresh Python process (``multiprocessing`` "spawn"), so memory freed by
        earlier work cannot hide the call's own; ``fn``, its arguments and its result must be picklable.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryResult(peak - baseline, baseline, str(device), "cuda max_memory_allocated", seconds, result)
    if device.type != "cpu":
        raise ValueError(f"The 'device' parameter of peak_memory must be a CUDA device or 'cpu'. Got {str(device)!r}.")
    if isolate:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_child, args=(queue, fn, args, kwargs))
        process.start()
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not process.is_alive() and queue.empty():  # killed (out of memory?) before it could report
                    raise RuntimeError(f"peak_memory(isolate=True): the subprocess died with exit code {process.exitcode}.") from None
        process.join()
        if status != "ok":
            raise RuntimeError(f"peak_memory(isolate=True): the measured call failed in the subprocess: {payload}")
        return payload
    if not _linux_rss_supported():
        raise RuntimeError("peak_memory on CPU without /proc/self/clear_refs (not Linux) needs isolate=True.")
    return _cpu_peak_in_process(fn, args, kwargs)
