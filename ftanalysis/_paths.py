"""Where the package keeps files it builds for a user: ``$FTA_CACHE_DIR``, else the platform's cache folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def user_cache_dir() -> Path:
    """``$FTA_CACHE_DIR`` if set; else ``~/Library/Caches/ftanalysis`` (macOS), ``%LOCALAPPDATA%\\ftanalysis``
    (Windows) or ``$XDG_CACHE_HOME/ftanalysis`` (default ``~/.cache/ftanalysis``) elsewhere."""
    env = os.environ.get("FTA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ftanalysis"
    if sys.platform.startswith("win") and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "ftanalysis"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftanalysis"
