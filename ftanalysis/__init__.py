"""ftanalysis: what does fine-tuning do to a neural network?

Fine-tuning methods behind one API, probes of weight and activation changes, and the notebooks that use them.

>>> import ftanalysis as fta
>>> model, tok = fta.zoo.load("gpt2-tiny")
>>> task = fta.tasks.make("modular_arithmetic", op="-")
>>> result = fta.finetune(model, tok, task, fta.methods.LoRA(r=4), steps=2, lr=1e-3, progress=False)
>>> ft = result.merged_model()
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Submodules and names are imported on first use (PEP 562), so ``import ftanalysis`` and ``ftanalysis --help``
# do not pay for torch and transformers until something needs them.
_SUBMODULES = ("merging", "methods", "nn", "notebook", "plotting", "probes", "tasks", "zoo")
_NAMES = {
    "cached_finetune": ".cache",
    "TrainerSetup": ".hf_trainer",
    "prepare_for_trainer": ".hf_trainer",
    "export_peft": ".methods.peft_io",
    "load_peft": ".methods.peft_io",
    "FinetuneResult": ".train",
    "choose_device": ".train",
    "finetune": ".train",
    "load_model": ".zoo.loading",
}

__all__ = ["FinetuneResult", "cached_finetune", "notebook", "choose_device", "finetune", "load_model", "merging", "methods", "nn", "plotting", "probes", "tasks", "zoo", "__version__"]
__all__ += ["export_peft", "load_peft", "TrainerSetup", "prepare_for_trainer"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    else:
        raise AttributeError(f"module 'ftanalysis' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
