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
    steps = steps or recipe.steps
    recipe = Recipe(**{**recipe.__dict__, "steps": steps})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


def save_model(model, tok, card: dict, out: str | Path) -> None:
    """Write model, tokenizer and card to ``out`` atomically (a temporary folder, then a rename)."""
    out = Path(out)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ftanalysis zoo pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--snapshot-every", type=int, default=0)
    parser.add_argument("--init-from", default=None, help="continue from the weights in this model/snapshot folder")
    parser.add_argument("--start-step", type=int, default=0, help="with --init-from: step of the schedule and data to start at")
    parser.add_argument("--lm-loss-weight", type=float, default=None, help="override the recipe's lm_loss_weight")
    parser.add_argument("--d-model", type=int, default=None, help="override the recipe's width (d_mlp = 4 d_model)")
    args = parser.parse_args(argv)
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
