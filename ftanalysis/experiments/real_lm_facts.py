"""The SmolLM2 fine-tunes of notebook 09: invented facts injected with LoRA at several ranks and learning rates.

Notebook ``09_real_lm_finetuning`` asks what LoRA and full fine-tuning change in a real decoder LM
(Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228). The skill
is one SmolLM2-135M-Instruct lacks: facts about invented people (``fta.tasks.make("invented_facts")``, base
accuracy 0). Full fine-tuning is trained in the notebook (a full copy cannot ship: 540 MB); the LoRA runs
that the intruders-forgetting link needs are too slow for a CPU notebook and ship as PEFT adapters (float16)
in ``data/finetuned/<name>/`` with a ``card.json`` of the recipe, the seconds it took and what it measured.

Every run: answer-token loss, AdamW, batch 16, constant learning rate, seed 0, LoRA on every attention and
MLP matrix with ``alpha = 2 r`` (scaling 2) and PEFT's default initialisation (Kaiming-uniform A, B = 0), as in
Shuttleworth et al.'s code. The package's default Gaussian A (std 1/r, PEFT's ``init_lora_weights="gaussian"``)
is up to 40x larger at r = 1, and with Adam the step of ``B A`` scales with A: measured first, r = 1 at lr 1e-3
then lost most of the IOI logit difference (5.4 -> 1.5). Rebuild with::

    python -m ftanalysis.experiments.real_lm_facts --out data/finetuned
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import methods, zoo
from ..methods.peft_io import export_peft, load_peft
from ..probes.language_retention import LMRetention
from ..tasks import make
from ..train import finetune

BASE = "smollm2-135m"
RELATIONS = ("city", "job")  # 100 people x 2 relations = 200 facts (20 cities, 10 jobs)
N_PEOPLE = 100
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "finetuned"


def facts_task(template: str = "train"):
    """The injected knowledge: 200 facts about 100 invented people (``template="paraphrase"``: other wordings)."""
    return make("invented_facts", n_people=N_PEOPLE, relations=RELATIONS, template=template)


@dataclass(frozen=True)
class FactsRecipe:
    """One fine-tune of SmolLM2 on the invented facts."""

    method: str  # "lora" or "full"
    lr: float
    r: int | None = None
    steps: int = 120
    batch_size: int = 16
    seed: int = 0
    fused_optimizer: bool = False  # PyTorch's fused AdamW: the same steps up to rounding, a faster CPU update

    @property
    def name(self) -> str:
        kind = f"lora-r{self.r}" if self.method == "lora" else "full"
        return f"smollm2-facts-{kind}-lr{self.lr:g}"

    def make_method(self):
        if self.method == "lora":
            return methods.LoRA(r=self.r, alpha=2 * self.r, target="all-linear", init="kaiming")
        return methods.Full(freeze_embeddings=True)  # tied embeddings: freezing them keeps the LM head too


# The six shipped LoRA runs: three ranks x two learning rates (the reference probe found intruders at 3e-3 only).
LORA_RECIPES = tuple(FactsRecipe("lora", lr, r) for r in (1, 4, 8) for lr in (1e-3, 3e-3))
# Full fine-tuning, trained in the notebook; 3e-5 learns the facts in 120 steps (reference probe). Its AdamW update
# of 107M parameters is a fifth of a CPU step; the fused kernel makes it about 3x faster (notebook 09's CI time).
FULL_RECIPE = FactsRecipe("full", 3e-5, fused_optimizer=True)
RECIPES = {recipe.name: recipe for recipe in (*LORA_RECIPES, FULL_RECIPE)}


def train(recipe: FactsRecipe, model, tok, progress: bool = True, **kwargs):
    """``fta.finetune`` of ``recipe`` on the invented facts (a :class:`~ftanalysis.FinetuneResult`)."""
    return finetune(model, tok, facts_task(), recipe.make_method(), steps=recipe.steps, lr=recipe.lr,
                    batch_size=recipe.batch_size, seed=recipe.seed, fused_optimizer=recipe.fused_optimizer, progress=progress,
                    eval_n=64, **kwargs)


def evaluate(model, tok, retention: LMRetention, n: int = 200) -> dict:
    """The card's numbers: fact recall (trained wording and paraphrases) and the retention table."""
    table = retention(model)
    return {
        "facts": round(facts_task().evaluate(model, tok, n=n)["accuracy"], 4),
        "facts_paraphrase": round(facts_task("paraphrase").evaluate(model, tok, n=n)["accuracy"], 4),
        "retention": {row.measure: round(row.model, 4) for row in table.itertuples()},
    }


def save_adapter(result, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """``export_peft`` of a LoRA result, its tensors stored as ``dtype`` (float16 halves the file)."""
    export_peft(result, folder, base_model_name_or_path=BASE)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    return folder


def card_header(name: str, recipe, task, seconds: float, result) -> dict:
    """The fields every shipped SmolLM2 adapter's ``card.json`` starts with: what was trained, on what, how long."""
    return {
        "name": name,
        "base": BASE,
        "base_gguf_sha256": zoo.smollm2.GGUF_SHA256,
        "recipe": asdict(recipe),
        "training_task": repr(task),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_loss_last": round(float(result.history["train_loss"].iloc[-1]), 4),
    }


def make_finetune(recipe: FactsRecipe, out: Path, progress: bool = True) -> Path:
    """Train a LoRA recipe, save its adapter to ``out / recipe.name`` with a card, and return the folder.

    The card's numbers are measured on the saved (float16) adapter merged into the base: what the notebook loads.
    """
    if recipe.method != "lora":
        raise ValueError(f"Only LoRA recipes are shipped; {recipe.name!r} is trained in the notebook.")
    model, tok = zoo.load(BASE)
    started = time.perf_counter()
    result = train(recipe, model, tok, progress=progress)
    seconds = time.perf_counter() - started
    folder = Path(out) / recipe.name
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_adapter(result, tmp)
    retention = LMRetention(model, tok)
    merged = load_peft(model, tmp)
    card = {
        **card_header(recipe.name, recipe, facts_task(), seconds, result),
        "evaluation": {"base": evaluate(model, tok, retention), "finetuned": evaluate(merged, tok, retention)},
        "rebuild": f"python -m ftanalysis.experiments.real_lm_facts --recipes {recipe.name} --out {_shown(out)}",
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _shown(out: Path) -> str:
    """``out`` as the rebuild command should show it: ``data/finetuned`` for the checkout's own folder."""
    return "data/finetuned" if Path(out).resolve() == SHIPPED_DIR else str(out)


def load_shipped_adapter(name: str, base=None, root: str | Path | None = None, rebuild: str = __name__):
    """``(merged_model, card)`` of the shipped SmolLM2 PEFT adapter ``root / name``, merged into a copy of ``base``
    (default: a fresh load); ``rebuild`` is the module whose ``--recipes NAME`` builds it, named in the error.

    ``root`` defaults to ``$FTA_FINETUNED_DIR`` if set, else ``data/finetuned`` of the source checkout.
    """
    root = Path(root or os.environ.get("FTA_FINETUNED_DIR") or SHIPPED_DIR)
    folder = root / name
    if not (folder / "card.json").is_file():
        shipped = sorted(p.name for p in root.glob("smollm2-*")) if root.is_dir() else []
        raise FileNotFoundError(f"No shipped SmolLM2 fine-tune {name!r} in {root}. Shipped: {shipped}. "
                                f"Build it with: python -m {rebuild} --recipes {name}")
    if base is None:
        base, _ = zoo.load(BASE)
    return load_peft(base, folder).eval(), json.loads((folder / "card.json").read_text())


def load_finetuned(name: str, base=None, root: str | Path | None = None):
    """``(merged_model, card)`` of a shipped SmolLM2 adapter of notebook 09, merged into ``base`` (default: a fresh
    load); ``root`` as in :func:`load_shipped_adapter`."""
    return load_shipped_adapter(name, base, root)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the SmolLM2 LoRA fine-tunes of notebook 09 and save them as adapters.")
    parser.add_argument("--recipes", nargs="+", default=[r.name for r in LORA_RECIPES], choices=[r.name for r in LORA_RECIPES])
    parser.add_argument("--out", default=str(SHIPPED_DIR))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.recipes:
        folder = make_finetune(RECIPES[name], Path(args.out))
        card = json.loads((folder / "card.json").read_text())
        print(folder, json.dumps(card["evaluation"]["finetuned"]), f"{card['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
