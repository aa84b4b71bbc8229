"""Canonical model view: names, (out, in) orientation, GPT-2 Conv1D and fused q/k/v, write-back."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny

import ftanalysis as fta

EXPECTED_KINDS = {
    "gpt2": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
    "llama": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"],
    "bert": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_and_dims(family):
    model = make_tiny(family)
    view = fta.nn.ModelView(model)
    kinds = EXPECTED_KINDS[view.family]
    assert view.matrix_names() == [f"layers.{layer}.{k}" for layer in range(2) for k in kinds]
    assert view.n_layers == 2 and view.d_model == 32 and view.n_heads == 4 and view.d_head == 8
    d_mlp = 64 if family == "gpt2" else 48
    kv = 16 if family in ("llama", "qwen2", "mistral") else 32  # 2 kv heads of 8
    assert tuple(view.get("layers.1.attn.q").shape) == (32, 32)
    assert tuple(view.get("layers.1.attn.k").shape) == (kv, 32)
    assert tuple(view.get("layers.0.mlp.up").shape) == (d_mlp, 32)
    assert tuple(view.get("layers.0.mlp.down").shape) == (32, d_mlp)
    for _, w in view.matrices():
        assert w.dtype == torch.float32


def test_gpt2_conv1d_is_transposed_and_c_attn_split():
    model = make_tiny("gpt2")
    view = fta.nn.ModelView(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, 3 * out)
    assert torch.equal(view.get("layers.0.attn.q"), c_attn[:, :32].T)
    assert torch.equal(view.get("layers.0.attn.k"), c_attn[:, 32:64].T)
    assert torch.equal(view.get("layers.0.attn.v"), c_attn[:, 64:].T)
    assert torch.equal(view.get("layers.0.mlp.up"), model.transformer.h[0].mlp.c_fc.weight.T)
    assert view.ref("layers.0.attn.q").transposed


def test_canonical_matrix_computes_what_the_model_computes():
    """(out, in) means y = W x: check against the hidden q of a real forward pass, for GPT-2 and Llama."""
    for family in ("gpt2", "llama"):
        model = make_tiny(family)
        view = fta.nn.ModelView(model)
        x = torch.randn(1, 5, 32)
        module = view.module("layers.0.attn.q")
        out = module(x)[..., :32]
        bias = module.bias[:32] if module.bias is not None else 0
        assert torch.allclose(out, x @ view.get("layers.0.attn.q").T + bias, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_round_trip_and_write_back(family):
    model = make_tiny(family)
    view = fta.nn.ModelView(model)
    before = {n: w for n, w in view.matrices()}
    new = torch.randn_like(before["layers.1.attn.v"])
    view.set("layers.1.attn.v", new)
    assert torch.allclose(view.get("layers.1.attn.v"), new)
    for name, w in before.items():  # nothing else moved (q and k share c_attn on GPT-2)
        if name != "layers.1.attn.v":
            assert torch.equal(view.get(name), w), name


def test_set_rejects_wrong_shape_and_unknown_names():
    view = fta.nn.ModelView(make_tiny("gpt2"))
    with pytest.raises(ValueError, match=r"shape \(32, 32\)"):
        view.set("layers.0.attn.q", torch.zeros(32, 31))
    with pytest.raises(ValueError, match="Unknown matrix name 'layers.5.attn.q'"):
        view.get("layers.5.attn.q")
    with pytest.raises(ValueError, match="out of range"):
        view.block(7)


def test_unsupported_architecture_is_an_error():
    from transformers import T5Config, T5Model

    with pytest.raises(ValueError, match="Unsupported architecture 't5'"):
        fta.nn.ModelView(T5Model(T5Config(d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)))
    with pytest.raises(TypeError):
        fta.nn.ModelView("gpt2")


def test_view_finds_a_model_wrapped_in_another_module():
    class WithHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_tiny("bert")
            self.head = torch.nn.Linear(32, 2)

    view = fta.nn.ModelView(WithHead())
    assert view.family == "bert" and view.ref("layers.0.attn.q").module_path == "body.encoder.layer.0.attention.self.query"
