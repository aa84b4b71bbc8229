"""ftanalysis: what does fine-tuning do to a neural network?

Fine-tuning methods behind one API, probes of weight and activation changes, and the notebooks that use them.

>>> import ftanalysis as fta
>>> model, tok = fta.zoo.load("gpt2-tiny")
>>> task = fta.tasks.make("modular_arithmetic", op="-")
>>> result = fta.finetune(model, tok, task, fta.methods.LoRA(r=4), steps=2, lr=1e-3, progress=False)
>>> ft = result.merged_model()
"""

from __future__ import annotations

from . import merging, methods, nn, notebook, plotting, probes, tasks, zoo
from .cache import cached_finetune
from .hf_trainer import TrainerSetup, prepare_for_trainer
from .methods.peft_io import export_peft, load_peft
from .train import FinetuneResult, choose_device, finetune
from .zoo.loading import load_model

__version__ = "0.1.0"

__all__ = ["FinetuneResult", "cached_finetune", "notebook", "choose_device", "finetune", "load_model", "merging", "methods", "nn", "plotting", "probes", "tasks", "zoo", "__version__"]
__all__ += ["export_peft", "load_peft", "TrainerSetup", "prepare_for_trainer"]
