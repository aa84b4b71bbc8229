"""The fine-tuned checkpoints of the entity-tracking circuits notebook (``notebooks/05_entity_tracking_circuits``).

Prakash et al. 2024 compare LLaMA-7B with fine-tunes on arithmetic (Goat, FLoat) that happen to track entities
better. A tiny base does not behave that way (``shared/reference/zoo-pretraining.md``: a fine-tune on another
task alone destroys entity tracking, and with replay it holds but does not rise), so the recipes here are
chosen to *exercise the mechanism while replaying the pretraining mix*, next to a control of the same budget:

- ``et-more-boxes``: full fine-tune on entity tracking with more boxes (``--boxes``), mixed 50/50 with the
  pretraining mix (replay);
- ``et-more-boxes-lora``: the same data with LoRA (r=8 on the attention and MLP matrices);
- ``control-subtraction``: the same budget on a task that does not use the mechanism (modular subtraction,
  new to the base), mixed 50/50 with the same replay.

Each run is deterministic on CPU (batch ``t`` is a pure function of the task, the seed and ``t``) and is saved
with ``save_pretrained`` as ``data/finetuned/<base>-<recipe>/`` with the tokenizer and a ``card.json`` that
records the recipe, the seconds it took and the accuracies it reached. Rebuild them with::

    python -m ftanalysis.probes.circuits.finetunes --base gpt2-tiny --out data/finetuned
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ... import methods, zoo
from ...tasks import make
from ...tasks.arithmetic import ModularArithmetic
from ...tasks.entity_tracking import EntityTracking
from ...tasks.mixture import Mixture, PretrainingMix
from ...train import finetune


@dataclass(frozen=True)
class Recipe:
    """One fine-tune: its data (task + 50/50 replay of the pretraining mix), method and optimiser settings."""

    name: str
    description: str
    task: str  # "entity_tracking" or "modular_subtraction"
    method: str = "full"  # "full" or "lora"
    steps: int = 1500
    lr: float = 3e-4
    batch_size: int = 64
    replay: float = 0.5  # fraction of each batch drawn from the pretraining mix
    seed: int = 0


RECIPES = {
    "et-more-boxes": Recipe("et-more-boxes", "Full fine-tune on entity tracking with more boxes, 50% replay of the pretraining mix.", "entity_tracking"),
    "et-more-boxes-lora": Recipe("et-more-boxes-lora", "LoRA (r=8, all attention and MLP matrices) on the same data.", "entity_tracking",
                                 method="lora", lr=2e-3),
    "control-subtraction": Recipe("control-subtraction", "Control: the same budget on modular subtraction (mod 23), 50% replay.",
                                  "modular_subtraction"),
}


def training_task(recipe: Recipe, boxes: tuple[int, int]) -> Mixture:
    """The recipe's task mixed with the pretraining mix (replay)."""
    if recipe.task == "entity_tracking":
        new = EntityTracking(n_boxes=tuple(boxes))
    else:
        new = ModularArithmetic(op="-", modulus=23)
    return Mixture(tasks=(new, PretrainingMix()), weights=(1 - recipe.replay, recipe.replay))


def method_of(recipe: Recipe):
    return methods.Full() if recipe.method == "full" else methods.LoRA(r=8, alpha=16, target="all-linear")


def evaluate(model, tok, box_counts=(3, 5, 7, 8, 9), n: int = 512) -> dict:
    """Entity tracking at several box counts, modular subtraction and the pretraining mix (test splits)."""
    out = {f"entity_tracking_{b}": round(make("entity_tracking", n_boxes=b).evaluate(model, tok, n=n)["accuracy"], 4) for b in box_counts}
    out["modular_subtraction"] = round(make("modular_arithmetic", op="-", modulus=23).evaluate(model, tok, n=n)["accuracy"], 4)
    mix = make("pretraining_mix").evaluate(model, tok, n=n)
    out["pretraining_mix"] = round(mix["accuracy"], 4)
    return out


def weights_digest(model) -> str:
    """A short SHA-256 of a model's weights (state-dict order), to tie a fine-tune to the exact base it came from."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def make_finetune(base: str, recipe: Recipe, boxes: tuple[int, int], out: Path, progress: bool = True, eval_n: int = 512) -> Path:
    """Train one recipe on the zoo base ``base`` and save it to ``out / f"{base}-{recipe.name}"``.

    The card records the base's weight digest (:func:`weights_digest`) and both models' accuracies on
    ``eval_n`` test prompts per task.
    """
    model, tok = zoo.load(base)
    task = training_task(recipe, boxes)
    started = time.perf_counter()
    result = finetune(model, tok, task, method_of(recipe), steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size,
                      seed=recipe.seed, device="cpu", warmup_steps=50, schedule="cosine", progress=progress)
    seconds = time.perf_counter() - started
    merged = result.merged_model().eval()
    folder = out / f"{base}-{recipe.name}"
    folder.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(folder)
    tok.save_pretrained(folder)
    card = {
        "name": folder.name,
        "base": base,
        "base_digest": weights_digest(model),
        "recipe": asdict(recipe),
        "entity_tracking_boxes": list(boxes),
        "training_task": repr(task),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "evaluation": {"base": evaluate(model, tok, n=eval_n), "finetuned": evaluate(merged, tok, n=eval_n)},
        "rebuild": f"python -m ftanalysis.probes.circuits.finetunes --base {base} --recipes {recipe.name} "
                   f"--boxes {boxes[0]} {boxes[1]} --out {out}",
    }
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    return folder


def load_finetuned(name: str, root: str | Path | None = None):
    """``(model, tok, card)`` of a shipped fine-tune, e.g. ``load_finetuned("gpt2-tiny-et-more-boxes")``.

    ``root`` defaults to ``$FTA_FINETUNED_DIR`` if set, else ``data/finetuned`` of the source checkout.
    """
    from ...zoo.loading import load_model

    if root is None:
        root = os.environ.get("FTA_FINETUNED_DIR") or Path(__file__).resolve().parents[3] / "data" / "finetuned"
    root = Path(root)
    folder = root / name
    if not (folder / "card.json").is_file():
        shipped = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise FileNotFoundError(f"No fine-tuned checkpoint {name!r} in {root}. Shipped: {shipped}. "
                                "Build it with: python -m ftanalysis.probes.circuits.finetunes")
    model, tok = load_model(folder)
    return model.eval(), tok, json.loads((folder / "card.json").read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Make the fine-tuned checkpoints of the entity-tracking circuits notebook.")
    parser.add_argument("--base", default="gpt2-tiny")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--boxes", nargs=2, type=int, default=(5, 8), metavar=("LOW", "HIGH"),
                        help="box counts of the entity-tracking fine-tuning data (inclusive range)")
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's number of steps")
    parser.add_argument("--out", default="data/finetuned")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-n", type=int, default=512, help="test prompts per task for the card's accuracies")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.recipes:
        recipe = RECIPES[name]
        if args.steps:
            recipe = Recipe(**{**asdict(recipe), "steps": args.steps})
        folder = make_finetune(args.base, recipe, tuple(args.boxes), Path(args.out), eval_n=args.eval_n)
        card = json.loads((folder / "card.json").read_text())
        print(folder, json.dumps(card["evaluation"]), f"{card['seconds']} s")


if __name__ == "__main__":
    main()
