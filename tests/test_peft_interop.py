"""PEFT interoperability: same numbers as PEFT's LoRA/DoRA, export -> PEFT load, PEFT save -> our load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.methods.peft_io import _block_adapter

peft = pytest.importorskip("peft")

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_MODULES = ["c_attn", "c_proj", "c_fc"]


def _randomise(method, model, seed=0, scale=0.3):
    """Non-zero adapters (B = 0 would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 250, (3, 11), generator=g)


def _peft_layers(peft_model):
    return {n[len("base_model.model."):]: m for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _copy_ours_into_peft(ours, peft_model):
    """Write our per-part A, B (and DoRA magnitudes) into PEFT's layers, block-structured for GPT-2's c_attn."""
    peft_layers = _peft_layers(peft_model)
    with torch.no_grad():
        for path, layer in ours.items():
            target = peft_layers[path]
            A, B = _block_adapter(layer)
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
            if isinstance(layer, fta.methods.DoRALayer):
                from ftanalysis.methods.peft_io import _dora_magnitude

                target.lora_magnitude_vector["default"].weight.copy_(_dora_magnitude(layer))


def _outputs_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach()


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_llama_lora_matches_peft_outputs_and_gradients(rslora):
    base = make_tiny("llama")
    lora = fta.methods.LoRA(r=4, alpha=8, rslora=rslora)
    ours = lora.apply(base, copy=True)
    _randomise(lora, ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_MODULES, use_rslora=rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _copy_ours_into_peft(lora.lora_layers(ours), theirs)
    peft_layer = _peft_layers(theirs)["model.layers.0.self_attn.q_proj"]
    assert peft_layer.scaling["default"] == pytest.approx(lora.scaling) == pytest.approx(8 / 2 if rslora else 8 / 4)
    ids = _ids()
    a, b = _outputs_and_grads(ours, ids), _outputs_and_grads(theirs, ids)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    for path, layer in lora.lora_layers(ours).items():
        target = _peft_layers(theirs)[path]
        assert torch.allclose(layer.lora_A["full"].grad, target.lora_A["default"].weight.grad, atol=1e-5)
        assert torch.allclose(layer.lora_B["full"].grad, target.lora_B["default"].weight.grad, atol=1e-5)


def test_gpt2_lora_matches_peft_block_adapter_outputs_and_gradients():
    """Our q/k/v LoRA on the fused c_attn equals PEFT's rank-3r block-structured adapter, gradients included."""
    base = make_tiny("gpt2")
    r, alpha = 2, 6
    lora = fta.methods.LoRA(r=r, alpha=alpha)
    ours = lora.apply(base, copy=True)
    _randomise(lora, ours)
    attn = {f"transformer.h.{i}.attn.c_attn": 3 * r for i in range(2)}
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=GPT2_MODULES, fan_in_fan_out=True,
        rank_pattern=attn, alpha_pattern={k: 3 * alpha for k in attn},
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _copy_ours_into_peft(lora.lora_layers(ours), theirs)
    ids = _ids(1)
    a, b = _outputs_and_grads(ours, ids), _outputs_and_grads(theirs, ids)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    for path, layer in lora.lora_layers(ours).items():
        target = _peft_layers(theirs)[path]
        gA, gB = target.lora_A["default"].weight.grad, target.lora_B["default"].weight.grad
        for i, key in enumerate(sorted(layer.parts, key=lambda k: layer.parts[k].start)):
            rows = layer.parts[key]
            assert torch.allclose(layer.lora_A[key].grad, gA[i * r : (i + 1) * r], atol=1e-5)
            assert torch.allclose(layer.lora_B[key].grad, gB[rows, i * r : (i + 1) * r], atol=1e-5)


def test_dora_matches_peft_use_dora_outputs_and_gradients():
    base = make_tiny("llama")
    dora = fta.methods.DoRA(r=4, alpha=8)
    ours = dora.apply(base, copy=True)
    _randomise(dora, ours, scale=0.2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_MODULES, use_dora=True))
    _copy_ours_into_peft(dora.lora_layers(ours), theirs)
    ids = _ids(2)
    a, b = _outputs_and_grads(ours, ids), _outputs_and_grads(theirs, ids)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    for path, layer in dora.lora_layers(ours).items():
        target = _peft_layers(theirs)[path]
        assert torch.allclose(layer.lora_A["full"].grad, target.lora_A["default"].weight.grad, atol=1e-5)
        assert torch.allclose(layer.lora_B["full"].grad, target.lora_B["default"].weight.grad, atol=1e-5)
        assert torch.allclose(layer.lora_magnitude["full"].grad, target.lora_magnitude_vector["default"].weight.grad, atol=1e-5)


def test_dora_starts_at_the_row_norms_and_merges_like_peft():
    base = make_tiny("gpt2")
    dora = fta.methods.DoRA(r=2, target=["attn.q", "attn.v", "mlp.up"])
    ours = dora.apply(base, copy=True)
    W = fta.nn.ModelView(base).get("layers.0.attn.q")
    assert torch.allclose(dora.magnitudes(ours)["layers.0.attn.q"], W.norm(dim=1))
    _randomise(dora, ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=16 * 4 / 2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True,
                        rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 16}),
    )
    _copy_ours_into_peft(dora.lora_layers(ours), theirs)
    merged_ours = fta.nn.ModelView(dora.merge(ours))
    merged_theirs = fta.nn.ModelView(theirs.merge_and_unload())
    for name in merged_ours.matrix_names():
        assert torch.allclose(merged_ours.get(name), merged_theirs.get(name), atol=1e-5), name


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("gpt2", {"r": 2, "alpha": 4}),
        ("gpt2", {"r": 3, "alpha": 5, "target": ["attn.q", "attn.v", "mlp.down"], "rslora": True}),
        ("llama", {"r": 4, "alpha": 16, "target": ["attn", "mlp.down"]}),
    ],
    ids=["gpt2-all", "gpt2-qv-rslora", "llama-attn"],
)
def test_export_then_peft_load_gives_the_same_logits(tmp_path, family, kwargs):
    base = make_tiny(family)
    lora = fta.methods.LoRA(**kwargs)
    ours = lora.apply(base, copy=True)
    _randomise(lora, ours)
    ids = _ids(3)
    expected = ours(input_ids=ids).logits
    path = fta.export_peft(ours, tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (family == "gpt2")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    # and our own loader reads it back to the merged model
    merged = fta.load_peft(base, path)
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def test_export_of_a_finetune_result_and_of_dora(tmp_path, tok):
    from ftanalysis.zoo.architectures import TinyConfig, build_model

    base = build_model(TinyConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64), tok, seed=0)
    result = fta.finetune(base, tok, fta.tasks.make("copy"), fta.methods.DoRA(r=2), steps=3, lr=1e-2, batch_size=4, eval_n=16, progress=False)
    path = fta.export_peft(result, tmp_path / "dora")
    assert json.loads((path / "adapter_config.json").read_text())["use_dora"] is True
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    assert torch.allclose(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5)
    assert torch.allclose(fta.load_peft(base, path)(input_ids=ids).logits, result.merged_model()(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    "family, config",
    [
        ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_MODULES, fan_in_fan_out=True,
                      rank_pattern={"transformer.h.1.attn.c_attn": 6}, alpha_pattern={"c_fc": 3})),
        ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_MODULES, use_rslora=True, rank_pattern={"down_proj": 2})),
        ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    ],
    ids=["gpt2-patterns", "llama-rslora", "llama-dora"],
)
def test_peft_save_then_our_load_equals_merge_and_unload(tmp_path, family, config):
    base = make_tiny(family)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    if config.get("use_dora"):
        with torch.no_grad():
            for layer in _peft_layers(theirs).values():
                layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = fta.load_peft(base, tmp_path / "peft")
    reference = theirs.merge_and_unload()
    assert type(ours) is type(base)
    reference_state = reference.state_dict()
    changed = 0
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, reference_state[key], atol=1e-5), key
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed >= 4
    assert all(torch.equal(v, make_tiny(family).state_dict()[k]) for k, v in base.state_dict().items())  # base untouched


def test_load_peft_bad_input(tmp_path):
    base = make_tiny("llama")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fta.load_peft(base, tmp_path)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    theirs.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ValueError, match="LoRA adapters only"):
        fta.load_peft(base, tmp_path / "ia3")
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="does not have"):
        fta.load_peft(make_tiny("gpt2"), tmp_path / "lora")


def test_export_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA, DoRA or \(IA\)\^3 layer"):
        fta.export_peft(make_tiny("gpt2"), tmp_path)
    with pytest.raises(TypeError, match="FinetuneResult"):
        fta.export_peft("model", tmp_path)
    pissa = fta.methods.LoRA(r=2, init="pissa", target="attn.q").apply(make_tiny("llama"), copy=True)
    with pytest.raises(ValueError, match="residual"):
        fta.export_peft(pissa, tmp_path)


@pytest.mark.parametrize("zoo_name", ["gpt2-tiny", "llama-tiny"])
def test_export_of_a_chain_of_lora_covers_every_link(tmp_path, zoo_name):
    """Issue 23: a 3-link ChainLoRA exported only its last link (logits off by up to 18.6); now the whole chain."""
    model, tok = fta.zoo.load(zoo_name)
    chain = fta.methods.ChainLoRA(r=2, alpha=4, restart_every=4)
    result = fta.finetune(model, tok, fta.tasks.make("copy"), chain, steps=12, lr=1e-2, batch_size=8, eval_n=16, progress=False)
    assert result.method.links_ == 3
    path = fta.export_peft(result, tmp_path / "chain")
    config = json.loads((path / "adapter_config.json").read_text())
    layer = next(iter(chain.lora_layers(result.model).values()))
    assert layer.merged_links == 2 and config["r"] in (2 * 3, 2 * 3 * len(layer.parts))  # r x links (x parts of c_attn)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3]])
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        assert (expected - model(input_ids=ids).logits).abs().max() > 1.0  # the fine-tune moved the logits
        ours = fta.load_peft(model, path)(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()(input_ids=ids).logits
    # float32 rounding of three merges into the wrapped weights: the merged model itself is ~1e-5 from the live one
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    # delta_weights covers the chain too: base + delta is the merged model's weight
    merged, base = fta.nn.ModelView(result.merged_model()), fta.nn.ModelView(model)
    for name, delta in chain.delta_weights(result.model).items():
        torch.testing.assert_close(base.get(name) + delta, merged.get(name), atol=1e-5, rtol=1e-5)


def test_restart_of_a_plain_lora_is_refused():
    lora = fta.methods.LoRA(r=2, target="attn.q")
    adapted = lora.apply(make_tiny("llama"), copy=True)
    with pytest.raises(ValueError, match="plain LoRA layer"):
        fta.methods.ChainLoRA(r=2, target="attn.q").restart(adapted)


@pytest.mark.parametrize(
    "zoo_name, method",
    [
        ("gpt2-tiny", fta.methods.LoRA(r=2, alpha=3, rslora=True, dropout=0.1, init="kaiming", train_a=False)),
        ("llama-tiny", fta.methods.DoRA(r=2, alpha=4, rslora=True, target=["attn", "mlp.up"])),
        ("gpt2-tiny", fta.methods.ChainLoRA(r=1, alpha=2, rslora=True, restart_every=2, target=["attn.q", "attn.v"])),
    ],
    ids=["lora-rslora-kaiming-b-only", "dora-rslora", "chain-rslora-qv"],
)
def test_export_of_every_lora_family_finetune_gives_its_logits(tmp_path, zoo_name, method):
    """Issue 23: no other LoRA-family fine-tune loses part of its update on export (trained through fta.finetune)."""
    model, tok = fta.zoo.load(zoo_name)
    result = fta.finetune(model, tok, fta.tasks.make("copy"), method, steps=5, lr=1e-2, batch_size=8, eval_n=8, progress=False)
    path = fta.export_peft(result, tmp_path / "adapter")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()(input_ids=ids).logits
        ours = fta.load_peft(model, path)(input_ids=ids).logits
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method",
    [fta.methods.ChainLoRA(r=2, init="pissa", restart_every=2, target="attn.q"), fta.methods.CorDA(r=2, target="attn.q", n_batches=1, batch_size=4)],
    ids=["chain-pissa", "corda"],
)
def test_export_of_residual_base_finetunes_is_refused(tmp_path, method):
    """PiSSA links and CorDA hold W0 - s B0 A0 in the wrapped weight: an adapter would not apply to the base."""
    model, tok = fta.zoo.load("gpt2-tiny")
    result = fta.finetune(model, tok, fta.tasks.make("copy"), method, steps=3, lr=1e-3, batch_size=4, eval_n=4, progress=False)
    with pytest.raises(ValueError, match="residual"):
        fta.export_peft(result, tmp_path / "adapter")
