"""The pretraining script: a few steps write a loadable base with its card; continuing from a snapshot."""

import json

import pytest

import ftanalysis as fta
from ftanalysis.zoo.architectures import TinyConfig
from ftanalysis.zoo.pretrain import lr_at, pretrain
from ftanalysis.zoo.recipes import RECIPES, Recipe


def tiny_recipe(**overrides) -> Recipe:
    base = dict(
        name="gpt2-test", model=TinyConfig(arch="gpt2", n_layers=1, d_model=16, n_heads=2, d_mlp=32),
        description="test", steps=4, batch_size=8, warmup_steps=1, eval_every=2, lm_loss_weight=1.0,
    )
    return Recipe(**{**base, **overrides})


def test_recipes_match_the_shipped_cards():
    assert {"gpt2-tiny", "llama-tiny"} <= set(RECIPES)
    for name in fta.zoo.available():
        if name in RECIPES:
            card = fta.zoo.read_card(fta.zoo.zoo_dir() / name)
            assert card["recipe"]["model"] == RECIPES[name].model.to_dict()
            assert card["recipe"]["lm_loss_weight"] == RECIPES[name].lm_loss_weight


def test_schedule_warms_up_then_decays_to_the_floor():
    recipe = tiny_recipe(steps=100, warmup_steps=10, lr=1.0, final_lr_fraction=0.1)
    assert lr_at(0, recipe) == pytest.approx(0.1)
    assert lr_at(9, recipe) == pytest.approx(1.0)
    assert lr_at(100, recipe) == pytest.approx(0.1)
    assert lr_at(30, recipe) > lr_at(60, recipe)


def test_pretrain_writes_a_loadable_base_with_card_and_snapshots(tmp_path):
    card = pretrain(tiny_recipe(), seed=0, out=tmp_path / "base", snapshot_every=2, card_examples=8, log=lambda _: None)
    assert card["trained_steps"] == 4 and card["initialised_from"] is None
    assert [row["step"] for row in card["history"]] == [2, 4]
    on_disk = json.loads((tmp_path / "base" / "card.json").read_text())
    assert on_disk["parameters"] == card["parameters"] and "entity_tracking_3" in on_disk["evaluation"]
    model, tok = fta.load_model(tmp_path / "base")
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert (tmp_path / "base" / "snapshots" / "step_2" / "config.json").is_file()
    assert not (tmp_path / "base.tmp").exists()


def test_continuing_from_a_snapshot_starts_at_its_step_and_checks_the_architecture(tmp_path):
    pretrain(tiny_recipe(), seed=0, out=tmp_path / "a", snapshot_every=2, card_examples=8, log=lambda _: None)
    card = pretrain(
        tiny_recipe(), seed=0, out=tmp_path / "b", init_from=tmp_path / "a" / "snapshots" / "step_2", start_step=2,
        card_examples=8, log=lambda _: None,
    )
    assert card["initialised_from"]["start_step"] == 2
    assert [row["step"] for row in card["history"]] == [4]
    with pytest.raises(ValueError, match="start_step"):
        pretrain(tiny_recipe(), seed=0, out=tmp_path / "c", init_from=tmp_path / "a", start_step=9, log=lambda _: None)
    with pytest.raises(ValueError, match="llama"):
        pretrain(
            tiny_recipe(model=TinyConfig(arch="llama", n_layers=1, d_model=16, n_heads=2, d_mlp=32)),
            seed=0, out=tmp_path / "d", init_from=tmp_path / "a", start_step=2, log=lambda _: None,
        )
