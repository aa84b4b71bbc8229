"""ftanalysis: what does fine-tuning do to a neural network?

Fine-tuning methods behind one API, probes of weight and activation changes, and the notebooks that use them.

>>> import ftanalysis as fta
>>> model, tok = fta.zoo.load("gpt2-tiny")
>>> task = fta.tasks.make("modular_arithmetic", op="-")
>>> result = fta.finetune(model, tok, task, fta.methods.LoRA(r=4), steps=2, lr=1e-3, progress=False)
>>> ft = result.merged_model()
"""

from __future__ import annotations

from ._lazy import lazy_attributes

__version__ = "0.1.0"

# Submodules and names are imported on first use (PEP 562), so ``import ftanalysis`` and ``ftanalysis --help``
# do not pay for torch and transformers until something needs them.
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


__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)  # the submodules too, found by name
