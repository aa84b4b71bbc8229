"""Shipping a fine-tune as its trained parameters (LoRA factors and a new head) and loading it back bit for bit."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import ftanalysis as fta
from ftanalysis.experiments import minilm_intruders
from ftanalysis.experiments.trained_parameters import load_trained, read_card, save_trained, shipped_or_cached_finetune


@pytest.fixture(scope="module")
def minilm_run():
    base, tok = minilm_intruders.base_model()
    task = fta.tasks.make("sentiment_negation")
    method = fta.methods.LoRA(r=4, alpha=8)
    result = fta.finetune(base, tok, task, method, steps=3, lr=1e-3, batch_size=8, seed=0, progress=False)
    return base, tok, task, method, result


def test_round_trip_is_bit_identical_with_the_head(minilm_run, tmp_path):
    base, tok, task, method, result = minilm_run
    card = {"run": fta.cache.run_description("minilm+head", base, task, method, {"steps": 3, "lr": 1e-3, "batch_size": 8, "seed": 0})}
    folder = save_trained(result, base, tmp_path / "run", card)
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "history.csv", "trained.safetensors"]
    saved = read_card(folder)
    assert saved["method"] == repr(method) and saved["trained_parameters"] == result.trainable_parameters
    merged, history, _ = load_trained(folder, base, method)
    expected = result.merged_model().state_dict()
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # identical, not close
    assert not torch.equal(got["head.weight"], base.state_dict()["head.weight"])  # the head is carried
    assert list(history["train_loss"]) == pytest.approx(list(result.history["train_loss"]))


def test_another_base_or_method_is_refused(minilm_run, tmp_path):
    base, tok, task, method, result = minilm_run
    folder = save_trained(result, base, tmp_path / "run", {})
    with pytest.raises(ValueError, match="trained with LoRA"):
        load_trained(folder, base, fta.methods.LoRA(r=8, alpha=16))
    other = fta.zoo.EncoderClassifier(base.body, 2, seed=1)
    with pytest.raises(ValueError, match="weight fingerprint"):
        load_trained(folder, other, method)
    with pytest.raises(FileNotFoundError, match="card.json"):
        load_trained(tmp_path / "nothing", base, method)


def test_shipped_run_is_used_only_for_the_same_description(minilm_run, tmp_path, monkeypatch, caplog):
    base, tok, task, method, result = minilm_run
    kwargs = {"steps": 3, "lr": 1e-3, "batch_size": 8, "seed": 0}
    save_trained(result, base, tmp_path / "shipped" / "run", {"run": fta.cache.run_description("minilm+head", base, task, method, kwargs)})
    monkeypatch.setenv("FTA_CACHE", "0")
    with caplog.at_level(logging.INFO, logger="ftanalysis.cache"):
        merged, _ = shipped_or_cached_finetune("minilm+head", base, tok, task, method, shipped=tmp_path / "shipped", **kwargs)
    assert "loaded the shipped run" in caplog.text
    assert torch.equal(merged.state_dict()["head.weight"], result.merged_model().state_dict()["head.weight"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftanalysis.cache"):  # one argument differs: it trains
        shipped_or_cached_finetune("minilm+head", base, tok, task, method, shipped=tmp_path / "shipped", **{**kwargs, "steps": 1})
    assert "trained in" in caplog.text and "shipped" not in caplog.text


def test_notebook_02s_shipped_runs_are_complete_and_load():
    """Every LoRA run notebook 02 asks for at FTA_SCALE=ci ships, with a card whose description is the notebook's."""
    cards = {p.parent.name: json.loads(p.read_text()) for p in minilm_intruders.SHIPPED_DIR.glob("minilm-*/card.json")}
    base, tok = minilm_intruders.base_model()
    target = fta.tasks.make(minilm_intruders.TARGET)
    runs = [c["run"] for c in cards.values()]
    for label, (rank, lr) in minilm_intruders.LORA_RUNS.items():
        kwargs = {"steps": minilm_intruders.STEPS, "lr": lr, "batch_size": minilm_intruders.BATCH_SIZE, "seed": 0, "progress": False}
        assert fta.cache.run_description(minilm_intruders.BASE_NAME, base, target, minilm_intruders.lora(rank), kwargs) in runs, label
    assert len(cards) == len(minilm_intruders.LORA_RUNS) + len(minilm_intruders.SEQUENCE) - 1
    name, card = next((n, c) for n, c in cards.items() if "r8-lr0.001" in n and "sequence" not in n)
    merged, _, _ = load_trained(minilm_intruders.SHIPPED_DIR / name, base, minilm_intruders.lora(8))
    assert target.evaluate(merged, tok, n=128)["accuracy"] > 0.85  # the card's accuracy (n=512) is about 0.94
