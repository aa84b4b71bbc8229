"""Pretrain a zoo base on the pretraining mix and write it, with its model card, to a directory.

Run ``ftanalysis zoo pretrain gpt2-tiny --seed 0 --out data/zoo/gpt2-tiny`` (or ``python -m
ftanalysis.zoo.pretrain ...``). Several seeds can run side by side; keep one whose card passes.

What makes this hard (measured, see the model card): tiny models trained on entity tracking sit on a chance
plateau for thousands of steps and then jump, at a step that depends on the seed; a copying / associative
recall task in the mix is what makes the jump happen at all. A common false plateau sits at about
0.65 / 0.40 / 0.30 on 3 / 5 / 7 boxes (two candidates out of n). The card records the step of the jump.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from .._validation import check_device, check_int
from ..tasks import build_tokenizer, make
from ..tasks.base import answer_loss
from .architectures import TinyConfig, build_model
from .card import card_evaluation, write_card
from .recipes import RECIPES, Recipe


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``final_lr_fraction * lr``."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.final_lr_fraction
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(
    recipe: Recipe,
    seed: int,
    out: str | Path,
    steps: int | None = None,
    device: str | None = None,
    snapshot_every: int = 0,
    init_from: str | Path | None = None,
    start_step: int = 0,
    card_examples: int | None = None,
    log=print,
) -> dict:
    """Train ``recipe`` with ``seed`` and save the model, tokenizer and card in ``out``.

    Returns the card (a dict). ``snapshot_every`` > 0 also saves ``out/snapshots/step_<n>`` along the way.
    ``init_from`` continues from the weights of a saved model or snapshot (a fresh optimizer) at step
    ``start_step`` of the schedule and of the data stream; the card records both, so the run can be repeated.
    ``card_examples`` sets how many test examples per task the card's evaluation uses (default: the card's).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"The 'recipe' parameter of pretrain must be a Recipe (e.g. RECIPES['gpt2-tiny']). Got {type(recipe).__name__}.")
    check_int(seed, "seed", "pretrain")
    # None means the recipe's length; 0 is an error, not "the whole recipe" (issue 23)
    steps = recipe.steps if steps is None else check_int(steps, "steps", "pretrain", 1)
    check_int(snapshot_every, "snapshot_every", "pretrain", 0)
    check_int(start_step, "start_step", "pretrain", 0)
    if card_examples is not None:
        check_int(card_examples, "card_examples", "pretrain", 1)
    check_output_folder(out, "pretrain")  # before hours of training, not after
    recipe = Recipe(**{**recipe.__dict__, "steps": steps})
    device = check_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = build_tokenizer()
    mix = make(recipe.mixture)
    model = build_model(recipe.model, tok, seed=seed)
    if init_from is not None:
        from .loading import load_model

        initial = load_model(init_from)[0]
        if initial.config.model_type != model.config.model_type:
            raise ValueError(
                f"init_from={init_from} holds a {initial.config.model_type} model; recipe {recipe.name} builds "
                f"{model.config.model_type}."
            )
        model.load_state_dict(initial.state_dict())
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step must be in [0, steps={steps}); got {start_step}.")
    model = model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=recipe.betas,
    )
    probes = {n: make("entity_tracking", n_boxes=n) for n in (3, 5, 7)}
    history, emerged_at, stop_from = [], None, None
    start = time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    step = start_step - 1
    for step in range(start_step, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = mix.batch(tok, recipe.batch_size, step=step + 1_000_000 * seed, split="train", device=device)
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = answer_loss(logits, batch["labels"])
        if recipe.lm_loss_weight:
            every_token = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = loss + recipe.lm_loss_weight * answer_loss(logits, every_token)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Pretraining loss became {loss.item()} at step {step}.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % recipe.eval_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "loss": float(loss.detach()), "seconds": round(time.time() - start, 1)}
            for n, task in probes.items():
                row[f"et{n}"] = task.evaluate(model, tok, split="val", n=256)["accuracy"]
            if emerged_at is None and row["et3"] >= 0.9:
                emerged_at = step + 1
            if stop_from is None and recipe.stop_at_et3 is not None and row["et3"] >= recipe.stop_at_et3:
                stop_from = step + 1
            history.append(row)
            log(json.dumps(row))
        if stop_from is not None and step + 1 >= stop_from + recipe.steps_after_emergence:
            log(json.dumps({"stopped_early_at": step + 1, "et3_reached_at": stop_from}))
            break
        if snapshot_every and (step + 1) % snapshot_every == 0:
            snap = Path(out) / "snapshots" / f"step_{step + 1}"
            snap.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(snap)
            tok.save_pretrained(snap)
    wall = time.time() - start
    trained_steps = step + 1
    model = model.float().cpu()
    evaluation = card_evaluation(model, tok) if card_examples is None else card_evaluation(model, tok, n=card_examples)
    card = {
        "name": recipe.name,
        "description": recipe.description,
        "seed": seed,
        "entity_tracking_emerged_at_step": emerged_at,
        "trained_steps": trained_steps,
        "initialised_from": None if init_from is None else {"path": str(init_from), "start_step": start_step, "optimizer": "fresh AdamW"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": recipe.to_dict(),
        "mixture": [{"task": repr(t), "weight": w} for t, w in zip(mix.tasks, mix.weights)],
        "evaluation": evaluation,
        "history": history,
        "wall_seconds": round(wall, 1),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    save_model(model, tok, card, out)
    return card


# what a pretraining output folder (and its temporary twin) holds: save_pretrained, the card, snapshots
OUTPUT_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "card.json", "README.md", "snapshots",
})


def _is_pretraining_output(folder: Path) -> bool:
    """A previous run's output (a card among our files) or an interrupted run's snapshots only."""
    names = {p.name for p in folder.iterdir()}
    if not names <= OUTPUT_NAMES:
        return False
    if "card.json" in names:
        return True
    return names == {"snapshots"} and all(p.name.startswith("step_") for p in (folder / "snapshots").iterdir())


def check_output_folder(out, owner: str = "pretrain") -> Path:
    """``out`` as a Path, refused when replacing it would delete something that is not a pretraining output.

    Accepted: a new path, an empty folder, or a folder holding a previous pretraining output (a ``card.json``
    among the files :func:`save_model` writes, or only ``snapshots/step_*`` of an interrupted run). The temporary
    twin ``<out>.tmp`` must be absent, empty or hold only such files.
    """
    if not isinstance(out, (str, os.PathLike)) or (isinstance(out, str) and not out.strip()):
        raise TypeError(f"The 'out' parameter of {owner} must be a folder path (str or Path). Got {out!r}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"The 'out' parameter of {owner} is {str(out)!r}, an existing file: give a folder path.")
    if out.is_dir() and any(out.iterdir()) and not _is_pretraining_output(out):
        raise ValueError(
            f"The 'out' folder {str(out)!r} of {owner} already exists and does not hold a pretraining output (no card.json "
            f"among {sorted(OUTPUT_NAMES)}). The output folder is replaced as a whole, so {owner} refuses to delete it: "
            "choose a new or empty folder, or a previous pretraining output."
        )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists() and (not tmp.is_dir() or not {p.name for p in tmp.iterdir()} <= OUTPUT_NAMES):
        raise ValueError(
            f"{owner} writes its output into {str(tmp)!r} first, which exists and holds files it did not write. "
            "Move it away or choose another 'out'."
        )
    return out


def save_model(model, tok, card: dict, out: str | Path) -> None:
    """Write model, tokenizer and card to ``out`` atomically (a temporary folder, then a rename).

    Refuses (``ValueError``) to replace an existing folder that is not empty and not a pretraining output.
    """
    out = check_output_folder(out, "save_model")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    write_card(card, tmp)
    if (out / "snapshots").exists():
        shutil.move(str(out / "snapshots"), str(tmp / "snapshots"))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ftanalysis zoo pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=_int_at_least(1), default=None, help="override the recipe's number of steps (>= 1)")
    parser.add_argument("--out", required=True, help="output folder: new, empty, or a previous pretraining output (replaced)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--snapshot-every", type=_int_at_least(0), default=0)
    parser.add_argument("--init-from", default=None, help="continue from the weights in this model/snapshot folder")
    parser.add_argument("--start-step", type=_int_at_least(0), default=0, help="with --init-from: step of the schedule and data to start at")
    parser.add_argument("--lm-loss-weight", type=_finite_float, default=None, help="override the recipe's lm_loss_weight")
    parser.add_argument("--d-model", type=_int_at_least(1), default=None, help="override the recipe's width (d_mlp = 4 d_model)")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out, "ftanalysis zoo pretrain")
        if args.device is not None:
            check_device(args.device)
    except (ValueError, TypeError, OSError) as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RECIPES[args.name]
    if args.lm_loss_weight is not None:
        recipe = Recipe(**{**recipe.__dict__, "lm_loss_weight": args.lm_loss_weight})
    if args.d_model is not None:
        model = TinyConfig(**{**recipe.model.to_dict(), "d_model": args.d_model, "d_mlp": 4 * args.d_model})
        recipe = Recipe(**{**recipe.__dict__, "model": model})
    card = pretrain(recipe, args.seed, args.out, steps=args.steps, device=args.device, snapshot_every=args.snapshot_every, init_from=args.init_from, start_step=args.start_step)
    print(json.dumps(card["evaluation"], indent=1))


if __name__ == "__main__":
    main()
