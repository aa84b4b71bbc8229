"""The MiniLM LoRA fine-tunes of notebook 02 (intruder dimensions), shipped so the notebook fits its CI budget.

Notebook ``02_intruder_dimensions`` compares LoRA with full fine-tuning on MiniLM (Shuttleworth et al. 2024,
"LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228). At ``FTA_SCALE=ci`` it trains 10
fine-tunes; on 2 CPU cores the 6 LoRA runs alone take about 6 minutes. They ship as their trained parameters
(LoRA factors and the new head, 1.3 MB at rank 8; :mod:`ftanalysis.experiments.trained_parameters`) in
``data/finetuned/<name>/`` with a card of the recipe, the seconds and the target accuracy. Full fine-tuning
is trained in the notebook (90 MB merged; notebooks 03 and 06 reuse it from the run's cache).

The notebook calls :func:`finetune`, which loads a shipped run only when its description (base weights, task,
method, arguments) is exactly the one asked for, and trains otherwise (``FTA_SCALE=full`` uses other step
counts, so it always trains). Rebuild with::

    python -m ftanalysis.experiments.minilm_intruders --out data/finetuned
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import methods, tasks, zoo
from ..cache import run_description
from ..train import finetune as train
from .trained_parameters import save_trained, shipped_or_cached_finetune

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "finetuned"
BASE_NAME = "minilm+head2(seed=0)"
TARGET = "sentiment_negation"
STEPS, SEQ_STEPS, BATCH_SIZE = 300, 150, 32  # the FTA_SCALE=ci recipe
# The LoRA runs at alpha = 2r: label -> (rank, learning rate). Full fine-tuning (lr 5e-5) trains in the notebook.
LORA_RUNS = {
    "lora r=8 lr=3e-4": (8, 3e-4),
    "lora r=8 lr=1e-3": (8, 1e-3),
    "lora r=8 lr=1.5e-3": (8, 1.5e-3),
    "lora r=64 lr=1e-3": (64, 1e-3),
}
SEQUENCE = ("sentiment_negation", "intensity", "subject_category")  # sequential fine-tuning, merged after each
SEQUENTIAL_LORA = "lora r=8 lr=1e-3"  # the LoRA run that goes on through the sequence


def lora(rank: int):
    return methods.LoRA(r=rank, alpha=2 * rank)


def base_model():
    """``(EncoderClassifier, tok)``: MiniLM with a fresh 2-class head (seed 0), the base of every run."""
    body, tok = zoo.load("minilm")
    return zoo.EncoderClassifier(body, 2, seed=0).eval(), tok


def sequence_start(model, step: int):
    """The start of task ``step`` (1, 2) of the sequence: ``model``'s body with a fresh head for that task."""
    return zoo.EncoderClassifier(model.body, tasks.make(SEQUENCE[step]).n_classes, seed=step).eval()


def sequence_name(previous_name: str, step: int, label: str) -> str:
    """The base label of task ``step``'s run: the previous base label and what was learned on it."""
    return f"{previous_name}->{SEQUENCE[step - 1]}[{label}]"


def finetune(base_name: str, model, tok, task, method, **kwargs):
    """``(merged_model, history)``: the shipped run with exactly this description, else ``fta.cached_finetune``."""
    return shipped_or_cached_finetune(base_name, model, tok, task, method, shipped=SHIPPED_DIR, **kwargs)


def _make(name: str, base_name: str, start, tok, task, method, lr: float, steps: int, seed: int, out: Path):
    kwargs = {"steps": steps, "lr": lr, "batch_size": BATCH_SIZE, "seed": seed}
    started = time.perf_counter()
    result = train(start, tok, task, method, progress=False, **kwargs)
    seconds = time.perf_counter() - started
    merged = result.merged_model().eval()
    card = {
        "name": name,
        "notebook": "02_intruder_dimensions",
        "run": run_description(base_name, start, task, method, {**kwargs, "progress": False}),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "accuracy": round(task.evaluate(merged, tok, n=512)["accuracy"], 4),
        "rebuild": "python -m ftanalysis.experiments.minilm_intruders --out data/finetuned",
    }
    save_trained(result, start, out / name, card)
    print(f"{name}: {seconds:.0f} s, accuracy {card['accuracy']}", flush=True)
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train notebook 02's LoRA fine-tunes of MiniLM and save their trained parameters.")
    parser.add_argument("--out", default=str(SHIPPED_DIR))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    base, tok = base_model()
    target = tasks.make(TARGET)
    merged = {}
    for label, (rank, lr) in LORA_RUNS.items():
        name = f"minilm-{TARGET}-lora-r{rank}-lr{lr:g}"
        merged[label] = _make(name, BASE_NAME, base, tok, target, lora(rank), lr, STEPS, 0, out)
    rank, lr = LORA_RUNS[SEQUENTIAL_LORA]
    model, base_name = merged[SEQUENTIAL_LORA], BASE_NAME
    for step in range(1, len(SEQUENCE)):
        base_name = sequence_name(base_name, step, SEQUENTIAL_LORA)
        start = sequence_start(model, step)
        name = f"minilm-sequence{step + 1}-{SEQUENCE[step]}-lora-r{rank}-lr{lr:g}"
        model = _make(name, base_name, start, tok, tasks.make(SEQUENCE[step]), lora(rank), lr, SEQ_STEPS, step, out)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
