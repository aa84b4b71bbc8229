"""Reading torch pickles safely: ``torch.load(weights_only=True)`` with errors that say why a file was refused.

The package never unpickles arbitrary objects (DESIGN: checkpoints are safetensors; ``weights_only=True`` at most).
A file that holds other objects is *refused*, which is not the same as *damaged*: the message says which.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


def safe_torch_load(path: Path, what: str = "file"):
    """``torch.load(path, weights_only=True)``; a refused pickle or a damaged file is a ``ValueError`` saying which."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise ValueError(
                f"The {what} {path} holds Python objects that safe loading (torch.load(weights_only=True)) refuses to "
                "unpickle; ftanalysis never unpickles untrusted files. Recreate it with this version of ftanalysis."
            ) from err
        raise ValueError(f"The {what} {path} is corrupt or incomplete (not a readable torch file): {err}") from err
    except (EOFError, RuntimeError, OSError) as err:
        raise ValueError(f"The {what} {path} is corrupt or incomplete (not a readable torch file): {err}") from err
