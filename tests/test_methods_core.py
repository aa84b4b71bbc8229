"""Full and LoRA: what trains, merge equals the unmerged forward, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, FAMILIES, make_tiny

import ftanalysis as fta


def _randomise_lora_b(model, seed=0):
    """Non-zero B so that merge tests can fail (at B = 0 every merge is trivially right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, fta.methods.LoRALayer):
                for B in layer.lora_B.values():
                    B.copy_(torch.randn(B.shape, generator=g) * 0.5)


def _forward(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["all-linear", "attn.q", ["attn.v", "mlp.down"], r"layers\.1\.attn\.[qk]"])
def test_lora_merge_equals_unmerged(family, target):
    model = make_tiny(family)
    ids = torch.randint(5, 200, (2, 9))
    reference = _forward(model, ids)
    lora = fta.methods.LoRA(r=4, alpha=8, target=target)
    adapted = lora.apply(model, copy=True)
    assert torch.allclose(_forward(adapted, ids), reference, atol=1e-6)  # B = 0: identity at init
    _randomise_lora_b(adapted)
    unmerged = _forward(adapted, ids)
    assert not torch.allclose(unmerged, reference, atol=1e-4)
    merged = lora.merge(adapted)
    assert type(merged) is type(model)
    assert not any(isinstance(m, fta.methods.LoRALayer) for m in merged.modules())
    assert torch.allclose(_forward(merged, ids), unmerged, atol=1e-5)


def test_lora_trains_only_adapters_and_counts_them():
    model = make_tiny("gpt2")
    lora = fta.methods.LoRA(r=4, target=["attn.q", "mlp.up"])
    adapted = lora.apply(model, copy=True)
    names = [n for n, _ in lora.trainable_parameters(adapted)]
    assert names and all("lora_" in n for n in names)
    # q: A (4, 32) + B (32, 4); mlp.up: A (4, 32) + B (64, 4); two layers
    assert sum(p.numel() for _, p in lora.trainable_parameters(adapted)) == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 64 * 4)
    assert lora.targets_ == ["layers.0.attn.q", "layers.0.mlp.up", "layers.1.attn.q", "layers.1.mlp.up"]


def test_lora_delta_is_scaled_by_alpha_over_r_and_rslora():
    model = make_tiny("llama")
    for rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
        lora = fta.methods.LoRA(r=4, alpha=16, target="layers.0.attn.q", rslora=rslora)
        adapted = lora.apply(model, copy=True)
        _randomise_lora_b(adapted)
        layer = adapted.model.layers[0].self_attn.q_proj
        expected = scale * layer.lora_B["full"] @ layer.lora_A["full"]
        assert torch.allclose(lora.delta_weights(adapted)["layers.0.attn.q"], expected)
        merged = lora.merge(adapted)
        assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight + expected, atol=1e-6)


def test_lora_b_only_freezes_a():
    lora = fta.methods.LoRA(r=2, train_a=False)
    adapted = lora.apply(make_tiny("gpt2"), copy=True)
    assert all("lora_B" in n for n, _ in lora.trainable_parameters(adapted))


@pytest.mark.parametrize("family", DECODERS)
def test_pissa_starts_at_the_base_model_and_uses_principal_directions(family):
    model = make_tiny(family)
    ids = torch.randint(5, 200, (2, 7))
    lora = fta.methods.LoRA(r=3, alpha=3, init="pissa", target="attn.v")
    adapted = lora.apply(model, copy=True)
    assert torch.allclose(_forward(adapted, ids), _forward(model, ids), atol=1e-4)
    W = fta.nn.ModelView(model).get("layers.0.attn.v")
    S = torch.linalg.svdvals(W)
    residual = fta.nn.ModelView(adapted).get("layers.0.attn.v")
    assert torch.allclose(torch.linalg.svdvals(residual)[:3], S[3:6], atol=1e-4)


def test_full_freezes_embeddings_and_head_on_request():
    model = make_tiny("llama")
    adapted = fta.methods.Full(freeze_embeddings=True).apply(model, copy=True)
    frozen = [n for n, p in adapted.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embed_tokens.weight"]
    adapted = fta.methods.Full(freeze_head=True).apply(make_tiny("llama"), copy=True)
    assert [n for n, p in adapted.named_parameters() if not p.requires_grad] == ["lm_head.weight"]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, "'r'"), ({"r": 2.5}, "'r'"), ({"alpha": 0}, "'alpha'"), ({"dropout": 1.0}, "'dropout'"), ({"init": "svd"}, "'init'")],
)
def test_lora_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fta.methods.LoRA(**kwargs)


def test_lora_rank_above_matrix_size_and_unknown_target():
    with pytest.raises(ValueError, match=r"min\(out, in\) = 32"):
        fta.methods.LoRA(r=33).apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match="matches no weight matrix.*attn.q"):
        fta.methods.LoRA(target="q_projection").apply(make_tiny("llama"), copy=True)


def test_applying_two_conflicting_methods_is_an_error():
    model = fta.methods.LoRA(r=2).apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match="already carries LoRA"):
        fta.methods.Full().apply(model)
    merged = fta.methods.LoRA(r=2).merge(model)  # after merging, a new method is fine
    fta.methods.Full().apply(merged)


def test_merge_without_apply_is_an_error():
    with pytest.raises(ValueError, match="no LoRA layer"):
        fta.methods.LoRA().merge(make_tiny("gpt2"))


def test_registry():
    assert {"full", "lora"} <= set(fta.methods.available())
    assert fta.methods.get("lora") is fta.methods.LoRA
    with pytest.raises(ValueError, match="Unknown method"):
        fta.methods.get("qlora")
