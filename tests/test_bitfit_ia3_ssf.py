"""BitFit, (IA)^3 and SSF: what trains, the folding formulas, PEFT's IA3 as an oracle, saving merged models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from transformers import LlamaForCausalLM

import ftanalysis as fta
from ftanalysis.train import TrainState


def _randomise(method, model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _step(method, model, ids):
    """One step through the method's own training_step (so its gradient hooks run)."""
    optimizer = method.make_optimizer(model, lr=1e-2)
    state = TrainState(step=0, steps=1, lr=1e-2, model=model, optimizer=optimizer, seed=0)
    method.training_step(state, {"input_ids": ids}, lambda b: model(input_ids=b["input_ids"]).logits.pow(2).mean(), grad_clip=None)


# ---------------------------------------------------------------------- BitFit
def test_bitfit_trains_every_bias_and_only_biases():
    model = make_tiny("gpt2")
    bitfit = fta.methods.BitFit()
    adapted = bitfit.apply(model, copy=True)
    names = [n for n, _ in bitfit.trainable_parameters(adapted)]
    all_biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert sorted(names) == sorted(all_biases)  # linear biases and LayerNorm betas, GPT-2 has them all
    assert not fta.methods.BitFit(norms=False).apply(model, copy=True).transformer.ln_f.bias.requires_grad


def test_bitfit_on_a_third_of_the_fused_c_attn_trains_only_that_third():
    model = make_tiny("gpt2")
    bitfit = fta.methods.BitFit(target="attn.q", norms=False)
    adapted = bitfit.apply(model, copy=True)
    before = adapted.transformer.h[0].attn.c_attn.bias.detach().clone()
    _step(bitfit, adapted, torch.randint(5, 200, (2, 7)))
    after = adapted.transformer.h[0].attn.c_attn.bias.detach()
    assert not torch.equal(after[:32], before[:32])
    assert torch.equal(after[32:], before[32:])


def test_bitfit_adds_biases_to_llama_and_the_merged_model_saves_and_reloads(tmp_path):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="add_missing=True"):
        fta.methods.BitFit(add_missing=False).apply(model, copy=True)
    bitfit = fta.methods.BitFit(target=["attn.v", "mlp.down"])
    adapted = bitfit.apply(model, copy=True)
    ids = torch.randint(5, 200, (2, 7))
    assert torch.equal(adapted(input_ids=ids).logits, model(input_ids=ids).logits)  # zero biases
    assert len(bitfit.trainable_parameters(adapted)) == 4
    _randomise(bitfit, adapted)
    merged = bitfit.merge(adapted)
    assert merged.config.attention_bias and merged.config.mlp_bias
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(reloaded(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)


# ---------------------------------------------------------------------- (IA)^3
def test_ia3_matches_peft_ia3_on_llama():
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    ia3 = fta.methods.IA3()
    ours = ia3.apply(model, copy=True)
    _randomise(ia3, ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    with torch.no_grad():
        for name, vector in ia3.vectors(ours).items():
            path = fta.nn.ModelView(model).ref(name).module_path
            target = theirs.base_model.model.get_submodule(path).ia3_l["default"]
            target.copy_(vector.view(target.shape))
    ids = torch.randint(5, 200, (3, 9))
    assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)
    reference = theirs.merge_and_unload()
    merged = ia3.merge(ours)
    for key, value in merged.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[key], atol=1e-6), key


def test_ia3_scales_gpt2_keys_values_and_mlp_activation():
    model = make_tiny("gpt2")
    ia3 = fta.methods.IA3()
    adapted = ia3.apply(model, copy=True)
    assert sum(p.numel() for _, p in ia3.trainable_parameters(adapted)) == 2 * (32 + 32 + 64)
    _randomise(ia3, adapted)
    vectors = ia3.vectors(adapted)
    x = torch.randn(3, 32)
    c_attn = adapted.transformer.h[0].attn.c_attn
    plain = c_attn.base_layer(x)
    out = c_attn(x)
    assert torch.equal(out[:, :32], plain[:, :32])  # queries untouched
    assert torch.allclose(out[:, 32:64], plain[:, 32:64] * vectors["layers.0.attn.k"])
    assert torch.allclose(out[:, 64:], plain[:, 64:] * vectors["layers.0.attn.v"])
    h = torch.randn(3, 64)
    c_proj = adapted.transformer.h[0].mlp.c_proj
    assert torch.allclose(c_proj(h), c_proj.base_layer(h * vectors["layers.0.mlp.down"]), atol=1e-6)
    ids = torch.randint(5, 200, (2, 7))
    assert torch.allclose(ia3.merge(adapted)(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)


def test_ia3_bad_input():
    with pytest.raises(ValueError, match="'feedforward'.*subset|must select targets"):
        fta.methods.IA3(target=["attn.k"], feedforward="mlp.down").apply(make_tiny("llama"), copy=True)
    with pytest.raises(ValueError, match="whole layers"):
        fta.methods.IA3(target=["attn.k", "attn.v"], feedforward="attn.k").apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match="matches no weight matrix"):
        fta.methods.IA3(target="key_proj").apply(make_tiny("llama"), copy=True)
    # a Hugging Face module name is a target (as in PEFT's target_modules)
    fta.methods.IA3(target=["k_proj", "down_proj"], feedforward="down_proj").apply(make_tiny("llama"), copy=True)


# ---------------------------------------------------------------------- SSF
def test_ssf_folds_into_the_previous_linear_layer_by_the_paper_formula():
    model = make_tiny("gpt2")
    ssf = fta.methods.SSF(target="mlp.up", norms=False)
    adapted = ssf.apply(model, copy=True)
    _randomise(ssf, adapted)
    layer = adapted.transformer.h[1].mlp.c_fc
    gamma, beta = layer.ssf_scale["full"].detach(), layer.ssf_shift["full"].detach()
    W, b = layer.base_layer.weight.detach().T.clone(), layer.base_layer.bias.detach().clone()  # (out, in)
    merged = ssf.merge(adapted)
    folded = merged.transformer.h[1].mlp.c_fc
    assert torch.allclose(folded.weight.T, gamma[:, None] * W, atol=1e-6)  # W' = diag(gamma) W
    assert torch.allclose(folded.bias, gamma * b + beta, atol=1e-6)  # b' = gamma * b + beta


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_ssf_identity_at_init_merge_equals_unmerged(family):
    model = make_tiny(family)
    ssf = fta.methods.SSF()
    adapted = ssf.apply(model, copy=True)
    ids = torch.randint(5, 200, (2, 7))
    out = lambda m: m(input_ids=ids)[0]  # noqa: E731
    assert torch.equal(out(adapted), out(model))
    _randomise(ssf, adapted, scale=0.1)
    assert torch.allclose(out(ssf.merge(adapted)), out(adapted), atol=1e-5)


def test_ssf_on_rmsnorm_scales_only_and_llama_merge_reloads(tmp_path):
    model = make_tiny("llama")
    ssf = fta.methods.SSF(target="attn.o")
    adapted = ssf.apply(model, copy=True)
    norm = adapted.model.layers[0].input_layernorm
    assert norm.ssf_shift is None and norm.ssf_scale["full"].shape == (32,)
    _randomise(ssf, adapted)
    merged = ssf.merge(adapted)
    assert merged.config.attention_bias
    merged.save_pretrained(tmp_path)
    ids = torch.randint(5, 200, (2, 7))
    assert torch.allclose(LlamaForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)


def test_ssf_bad_input():
    with pytest.raises(TypeError, match="'shift'"):
        fta.methods.SSF(shift="yes")
    with pytest.raises(ValueError, match="nothing to transform"):
        fta.methods.SSF(target=[], norms=False).apply(make_tiny("gpt2"), copy=True)
