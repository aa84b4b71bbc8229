"""The zoo's model cards: what a base was trained on and what it can do, measured.

Each shipped base has ``card.json`` (machine-readable, re-checked by the tests) and ``README.md`` (the same
for people) next to its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks import make

CARD_FILE = "card.json"

# What the card reports, on the test split of each task: the pretraining skills, entity tracking at several
# box counts (trained on 2-7), and arithmetic on held-out operand pairs (the mix trains on the whole table).
CARD_TASKS: dict[str, tuple[str, dict]] = {
    "entity_tracking_3": ("entity_tracking", {"n_boxes": 3}),
    "entity_tracking_5": ("entity_tracking", {"n_boxes": 5}),
    "entity_tracking_7": ("entity_tracking", {"n_boxes": 7}),
    "associative_recall": ("associative_recall", {}),
    "copy": ("copy", {}),
    "modular_addition": ("modular_arithmetic", {"op": "+", "modulus": 23, "holdout": False}),
    "modular_addition_heldout_pairs": ("modular_arithmetic", {"op": "+", "modulus": 23, "holdout": True}),
    "counting": ("counting", {"token": "a"}),
    "facts": ("facts", {}),
    "reverse (not pretrained)": ("reverse", {}),
    "modular_subtraction (not pretrained)": ("modular_arithmetic", {"op": "-", "modulus": 23}),
}
CARD_EXAMPLES = 1024


def card_evaluation(model, tok, n: int = CARD_EXAMPLES) -> dict:
    """Accuracy (with its 95% interval) and chance of every card task on ``n`` test examples."""
    out = {}
    for key, (name, options) in CARD_TASKS.items():
        scores = make(name, **options).evaluate(model, tok, split="test", n=n)
        out[key] = {
            "accuracy": round(scores["accuracy"], 4),
            "ci95": [round(x, 4) for x in scores["accuracy_ci"]],
            "loss": round(scores["loss"], 4),
            "chance": round(scores["chance"], 4),
        }
    mix = make("pretraining_mix").evaluate(model, tok, split="test", n=n)
    out["pretraining_mix"] = {"accuracy": round(mix["accuracy"], 4), "loss": round(mix["loss"], 4)}
    return out


def write_card(card: dict, directory: str | Path) -> None:
    """Write ``card.json`` and a human-readable ``README.md`` into ``directory``."""
    directory = Path(directory)
    (directory / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    lines = [
        f"# {card['name']}",
        "",
        card.get("description", ""),
        "",
        f"- Parameters: {card['parameters']:,}",
        f"- Seed: {card['seed']}; entity tracking (3 boxes >= 0.9 on val) emerged at step "
        f"{card.get('entity_tracking_emerged_at_step')}",
        f"- Pretraining: {card.get('trained_steps', card['recipe']['steps'])} steps (of at most {card['recipe']['steps']}) of {card['recipe']['batch_size']} examples, AdamW lr "
        f"{card['recipe']['lr']}, on {card.get('device')} in {card.get('wall_seconds')} s",
        "- Rebuild: " + ("the commands under *How it was made*" if card.get("lineage") else
                         f"`ftanalysis zoo pretrain {card['name']} --seed {card['seed']} --out <dir>`"),
        "",
    ]
    if card.get("lineage"):
        lines += ["## How it was made", ""]
        lines += [f"{i}. steps {stage['steps']}: `{stage['command']}`. {stage.get('note', '')}".rstrip() for i, stage in enumerate(card["lineage"], 1)]
        lines += [""]
    lines += [
        "## Pretraining mix",
        "",
        "| task | weight |",
        "|---|---|",
    ]
    lines += [f"| `{m['task']}` | {m['weight']} |" for m in card.get("mixture", [])]
    lines += ["", "## Accuracy (test split, 1024 examples, 95% Wilson interval)", "", "| task | accuracy | 95% CI | chance |", "|---|---|---|---|"]
    for key, row in card["evaluation"].items():
        if "ci95" in row:
            lines.append(f"| {key} | {row['accuracy']:.3f} | {row['ci95'][0]:.3f}-{row['ci95'][1]:.3f} | {row['chance']:.3f} |")
    mix = card["evaluation"].get("pretraining_mix")
    if mix:
        lines += ["", f"Pretraining-mix test accuracy {mix['accuracy']:.3f}, loss {mix['loss']:.3f} nats per answer token."]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


def read_card(directory: str | Path) -> dict:
    """The card of a zoo model directory (``ValueError`` if it is missing or not valid JSON)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No model card at {path}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"The model card {path} is not valid JSON: {err}") from err
