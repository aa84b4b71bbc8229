"""Settings for the whole test run (unit tests and notebooks)."""

from __future__ import annotations

import os


def pytest_configure(config):
    """Under pytest-xdist, one thread per worker: the workers share the cores, and so do the notebook kernels they
    start (a kernel inherits its worker's environment, so torch and BLAS there start with one thread too)."""
    if hasattr(config, "workerinput"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        import torch

        torch.set_num_threads(1)
