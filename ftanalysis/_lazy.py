"""Import a package's names and submodules on first use (PEP 562), so the command line's ``--help`` skips torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the submodule that defines it
    (``".spectral"``); any other submodule is reachable as an attribute too. A resolved value is kept in the
    package's globals, so each is imported once."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule: fta.probes.spectral, ...
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())))

    return __getattr__, __dir__
