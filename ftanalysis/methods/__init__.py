"""Fine-tuning methods behind one API: ``method.apply(model)``, ``method.merge(model)``.

>>> import ftanalysis as fta
>>> sorted(fta.methods.available())[:2]
['full', 'lora']
"""

from __future__ import annotations

from .adapters import Adapter
from .base import Method, applied_methods
from .bitfit import BitFit
from .chain import ChainLoRA
from .corda import CorDA
from .dora import DoRA, DoRALayer
from .full import Full
from .ia3 import IA3
from .layer_selection import HFT, LISA, GradientMaskTuning
from .lora import LoRA, LoRALayer
from .mezo import MeZO
from .prefix import PrefixTuning
from .probe import LinearProbe
from .sparse import LIFT, LTSFT, SparseDiff, SpIEL
from .ssf import SSF
from .subspace import SAID, Subspace, intrinsic_dimension_sweep
from .targets import resolve_targets

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under ``cls.name`` (its paper URL is ``cls.paper``)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A method named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (Full, LoRA, LinearProbe):
    register(_cls)
register(HFT)
register(LISA)
register(GradientMaskTuning)
register(LTSFT)
register(SpIEL)
register(LIFT)
register(Subspace)
register(SAID)
register(MeZO)
register(DoRA)
register(CorDA)
register(ChainLoRA)
register(BitFit)
register(IA3)
register(SSF)
register(Adapter)
register(PrefixTuning)


def available() -> dict[str, str]:
    """``{name: paper URL}`` of every registered method."""
    return {name: cls.paper for name, cls in sorted(_REGISTRY.items())}


def get(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}. Available: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


__all__ = ["Full", "LinearProbe", "LoRA", "LoRALayer", "Method", "applied_methods", "available", "get", "register", "resolve_targets"]
__all__ += ["GradientMaskTuning", "HFT", "LIFT", "LISA", "LTSFT", "MeZO", "SAID", "SparseDiff", "SpIEL", "Subspace", "intrinsic_dimension_sweep"]
__all__ += ["Adapter", "BitFit", "ChainLoRA", "CorDA", "DoRA", "DoRALayer", "IA3", "PrefixTuning", "SSF"]
