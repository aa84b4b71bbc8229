"""The SmolLM2 fine-tunes of notebook 10: does a fine-tune that exercises the IOI mechanism change its circuit?

Prakash et al. 2024 ("Fine-Tuning Enhances Existing Mechanisms", arXiv 2402.14811) claim that fine-tuning
strengthens a mechanism the base already has rather than building a new one. Notebook 10 asks it of the IOI circuit
of SmolLM2-135M-Instruct (Wang et al. 2022) with two LoRA fine-tunes of the same budget:

- ``smollm2-ioi-new-templates-lora-r8``: IOI in 7 templates that are none of Wang et al.'s (three with a
  distractor name; ``fta.tasks.make("ioi", templates="new")``), so the test prompts (Wang et al.'s templates)
  are never trained on;
- ``smollm2-arithmetic-lora-r8``: the control, two-digit addition (``digit_arithmetic``), which has no names.

Both: LoRA r 8 (alpha 16, PEFT's Kaiming initialisation) on every attention and MLP matrix, AdamW lr 1e-3, batch 16,
100 steps, answer-token loss, seed 0. They ship as float16 PEFT adapters in ``data/finetuned/<name>/`` with a
``card.json`` of the recipe and what it measured. Rebuild with::

    python -m ftanalysis.experiments.ioi_finetunes --out data/finetuned
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import methods, zoo
from ..methods.peft_io import load_peft
from ..tasks import make
from ..train import finetune
from .real_lm_facts import SHIPPED_DIR, card_header, load_shipped_adapter, save_adapter

BASE = "smollm2-135m"


@dataclass(frozen=True)
class IOIRecipe:
    """One LoRA fine-tune of SmolLM2 for notebook 10."""

    name: str
    task: str
    task_options: dict = field(default_factory=dict)
    r: int = 8
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 16
    seed: int = 0

    def make_task(self):
        return make(self.task, **self.task_options)

    def make_method(self):
        return methods.LoRA(r=self.r, alpha=2 * self.r, target="all-linear", init="kaiming")


RECIPES = {
    recipe.name: recipe
    for recipe in (
        IOIRecipe("smollm2-ioi-new-templates-lora-r8", "ioi", {"templates": "new"}),
        IOIRecipe("smollm2-arithmetic-lora-r8", "digit_arithmetic"),
    )
}


def evaluate(model, tok, n: int = 128) -> dict:
    """The card's numbers: IOI on Wang et al.'s templates and on the new ones, and addition."""
    wang, new = make("ioi").evaluate(model, tok, n=n), make("ioi", templates="new").evaluate(model, tok, n=n)
    return {
        "ioi_logit_diff": round(wang["logit_diff"], 4), "ioi_accuracy": round(wang["ioi_accuracy"], 4),
        "ioi_new_templates_logit_diff": round(new["logit_diff"], 4),
        "arithmetic_accuracy": round(make("digit_arithmetic").evaluate(model, tok, n=n)["accuracy"], 4),
    }


def make_finetune(recipe: IOIRecipe, out: Path, progress: bool = True) -> Path:
    """Train ``recipe``, save its adapter (float16) to ``out / recipe.name`` with a card, and return the folder.

    The card's numbers are measured on the saved adapter merged into the base: what the notebook loads.
    """
    model, tok = zoo.load(BASE)
    started = time.perf_counter()
    result = finetune(model, tok, recipe.make_task(), recipe.make_method(), steps=recipe.steps, lr=recipe.lr,
                      batch_size=recipe.batch_size, seed=recipe.seed, progress=progress, eval_n=64)
    seconds = time.perf_counter() - started
    folder = Path(out) / recipe.name
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(result, tmp)
    merged = load_peft(model, tmp)
    card = {
        **card_header(recipe.name, recipe, recipe.make_task(), seconds, result),
        "evaluation": {"base": evaluate(model, tok), "finetuned": evaluate(merged, tok)},
        "rebuild": f"python -m ftanalysis.experiments.ioi_finetunes --recipes {recipe.name} --out "
                   f"{'data/finetuned' if Path(out).resolve() == SHIPPED_DIR else out}",
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_finetuned(name: str, base=None, root: str | Path | None = None):
    """``(merged_model, card)`` of a shipped adapter of :data:`RECIPES`, merged into ``base`` (default: a fresh load).

    ``root`` defaults to ``$FTA_FINETUNED_DIR`` if set, else ``data/finetuned`` of the source checkout.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown IOI fine-tune {name!r}. Known: {sorted(RECIPES)}.")
    return load_shipped_adapter(name, base, root, rebuild=__name__)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train and save notebook 10's SmolLM2 LoRA fine-tunes.")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR)
    args = parser.parse_args(argv)
    for name in args.recipes:
        print(make_finetune(RECIPES[name], args.out))


if __name__ == "__main__":
    main()
