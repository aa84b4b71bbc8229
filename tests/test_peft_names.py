"""What PEFT users expect: ``target_modules=`` as an alias of ``target=`` and Hugging Face module names as targets."""

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.methods.targets import hf_name_map, resolve_targets


def _targets(model, target):
    return resolve_targets(fta.nn.ModelView(model), target)


def test_gpt2_module_names_select_what_peft_selects():
    model = make_tiny("gpt2")
    view = fta.nn.ModelView(model)
    layers = range(model.config.n_layer)
    assert _targets(model, "c_attn") == [f"layers.{i}.attn.{k}" for i in layers for k in "qkv"]
    assert _targets(model, "c_proj") == [n for i in layers for n in (f"layers.{i}.attn.o", f"layers.{i}.mlp.down")]
    assert _targets(model, ["c_fc"]) == [f"layers.{i}.mlp.up" for i in layers]
    assert hf_name_map(view) == {"c_attn": ["attn.k", "attn.q", "attn.v"], "c_fc": ["mlp.up"], "c_proj": ["attn.o", "mlp.down"]}


def test_llama_module_names_and_a_dotted_suffix():
    model = make_tiny("llama")
    n = model.config.num_hidden_layers
    assert _targets(model, ["q_proj", "v_proj"]) == [f"layers.{i}.attn.{k}" for i in range(n) for k in "qv"]
    assert _targets(model, "self_attn.o_proj") == [f"layers.{i}.attn.o" for i in range(n)]


def test_peft_and_ftanalysis_select_the_same_layers():
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    ours = fta.methods.LoRA(r=2, target_modules=["q_proj", "down_proj"]).apply(model, copy=True)
    theirs = peft.get_peft_model(make_tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    wrapped_ours = sorted(name for name, m in ours.named_modules() if hasattr(m, "lora_A"))
    wrapped_theirs = sorted(name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
                            if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert wrapped_ours == wrapped_theirs and len(wrapped_ours) == 2 * model.config.num_hidden_layers


def test_target_modules_is_an_alias_with_the_same_repr_and_result():
    model = make_tiny("gpt2")
    a = fta.methods.LoRA(r=2, target=["attn.q", "attn.v"])
    b = fta.methods.LoRA(r=2, target_modules=["attn.q", "attn.v"])
    assert repr(a) == repr(b) and b.target == ["attn.q", "attn.v"] and b.target_modules is None
    torch.manual_seed(0)
    pa = dict(a.trainable_parameters(a.apply(model, copy=True)))
    torch.manual_seed(0)
    pb = dict(b.trainable_parameters(b.apply(model, copy=True)))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert fta.methods.DoRA(r=2, target_modules="c_attn").target == "c_attn"
    ia3 = fta.methods.IA3(target_modules=["c_attn", "c_proj"], feedforward_modules=[])
    assert ia3.target == ["c_attn", "c_proj"] and ia3.feedforward == [] and "target_modules" not in repr(ia3)


def test_conflicting_target_and_target_modules_are_refused():
    with pytest.raises(ValueError, match="target_modules is PEFT's name for target"):
        fta.methods.LoRA(target=["attn.q"], target_modules=["attn.v"])
    with pytest.raises(ValueError, match="feedforward_modules is PEFT's name"):
        fta.methods.IA3(feedforward="attn.v", feedforward_modules="mlp.down")


def test_an_unknown_module_name_lists_the_model_s_module_names():
    with pytest.raises(ValueError, match=r"Hugging Face module name among \['c_attn', 'c_fc', 'c_proj'\]"):
        fta.methods.LoRA(target_modules="q_proj").apply(make_tiny("gpt2"), copy=True)
