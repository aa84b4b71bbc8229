"""Write a model folder all at once: into a temporary folder beside it, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path


def check_writable_folder(directory: Path, overwrite: bool, hint: str) -> None:
    """``FileExistsError`` for an existing non-empty ``directory`` (or a file there) unless ``overwrite``."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty: {hint}")


def write_model_folder(directory: str | Path, model, tok, files: Mapping[str, str], overwrite: bool, hint: str) -> Path:
    """``model.save_pretrained``, ``tok.save_pretrained`` (if given) and text ``files`` into ``directory``, atomically.

    An interrupted write leaves no half-written ``directory``; an existing non-empty one is refused unless
    ``overwrite`` (``hint`` says how to proceed), and replaced only once the new folder is complete.
    """
    directory = Path(directory)
    check_writable_folder(directory, overwrite, hint)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        if directory.exists():
            shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
