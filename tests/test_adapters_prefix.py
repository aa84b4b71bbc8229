"""Adapters and prefix tuning in He et al.'s unified view, including prefix tuning == gated parallel adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from einops import rearrange

import ftanalysis as fta
from ftanalysis.methods.prefix import prefix_attention


def _randomise(method, model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _out(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------- adapters
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_adapter_at_the_mlp_adds_s_times_the_bottleneck(mode):
    model = make_tiny("llama")
    adapter = fta.methods.Adapter(r=4, position="mlp", mode=mode, scaling=4.0)
    adapted = adapter.apply(model, copy=True)
    ids = torch.randint(5, 200, (2, 7))
    assert torch.equal(_out(adapted, ids), _out(model, ids))  # W_up = 0
    _randomise(adapter, adapted)
    bottleneck = adapter.adapters(adapted)["model.layers.1.mlp.down_proj"]
    x = torch.randn(3, 32)
    h = model.model.layers[1].mlp(x)
    z = x if mode == "parallel" else h
    expected = h + 4.0 * (torch.relu(z @ bottleneck.adapter_down.weight.T + bottleneck.adapter_down.bias) @ bottleneck.adapter_up.weight.T + bottleneck.adapter_up.bias)
    assert torch.allclose(adapted.model.layers[1].mlp(x), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_parallel_attention_adapter_reads_the_attention_input(family):
    model = make_tiny(family)
    adapter = fta.methods.Adapter(r=3, position="attn", mode="parallel", activation="gelu")
    adapted = adapter.apply(model, copy=True)
    _randomise(adapter, adapted)
    view, base_view = fta.nn.ModelView(adapted), fta.nn.ModelView(model)
    bottleneck = adapter.adapters(adapted)[view.ref("layers.0.attn.o").module_path]
    x = torch.randn(2, 5, 32)
    if family == "gpt2":
        got, ref = view.attention(0)(x)[0], base_view.attention(0)(x)[0]
        assert torch.allclose(got, ref + bottleneck(x), atol=1e-5)
    else:  # BERT: the adapter output joins the residual before the LayerNorm
        self_out = base_view.attention(0).output
        inner = base_view.attention(0).self(x)[0]
        expected = self_out.LayerNorm(self_out.dense(inner) + bottleneck(x) + x)
        assert torch.allclose(view.attention(0)(x)[0], expected, atol=1e-5)


def test_adapters_train_only_themselves_and_have_no_dense_form():
    model = make_tiny("gpt2")
    adapter = fta.methods.Adapter(r=4, position=["attn", "mlp"])
    adapted = adapter.apply(model, copy=True)
    names = [n for n, _ in adapter.trainable_parameters(adapted)]
    assert len(names) == 2 * 2 * 4 and all(".adapter." in n for n in names)
    assert adapter.sites_ == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]
    assert 0 < adapter.parameter_budget(adapted) < 0.5
    with pytest.raises(ValueError, match="no dense form"):
        adapter.merge(adapted)


def test_adapter_bad_input():
    with pytest.raises(ValueError, match="'r'"):
        fta.methods.Adapter(r=0)
    with pytest.raises(ValueError, match="'position'"):
        fta.methods.Adapter(position="ffn")
    with pytest.raises(ValueError, match="'mode'"):
        fta.methods.Adapter(mode="serial")
    with pytest.raises(ValueError, match="d_model = 32"):
        fta.methods.Adapter(r=33).apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match="out of range"):
        fta.methods.Adapter(layers=[5]).apply(make_tiny("gpt2"), copy=True)


# ---------------------------------------------------------------------- prefix tuning == gated parallel adapter
def _attend(q, k, v, causal_offset=None):
    """Plain scaled dot-product attention; ``causal_offset`` = number of always-visible leading keys."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [..., q, k]
    if causal_offset is not None:
        n_q, n_k = scores.shape[-2:]
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1), scores


def _gated_form(q, k, v, pk, pv, causal):
    """He et al. eq.: (1 - lambda) Attn(q, K, V) + lambda softmax(q P_k^T) P_v, lambda = prefix softmax mass."""
    attn, scores = _attend(q, k, v, 0 if causal else None)
    prefix_scores = q @ pk.transpose(-1, -2) / q.shape[-1] ** 0.5  # [..., q, l]
    prefix_mass = prefix_scores.exp().sum(-1, keepdim=True)
    sequence_mass = scores.exp().sum(-1, keepdim=True)  # exp(-inf) = 0 on masked keys
    lam = prefix_mass / (prefix_mass + sequence_mass)
    return (1 - lam) * (attn @ v) + lam * (prefix_scores.softmax(-1) @ pv), lam


def test_prefix_attention_function_equals_the_gated_parallel_adapter_with_gqa():
    torch.manual_seed(0)
    batch, heads, kv_heads, n, d, n_prefix = 2, 4, 2, 6, 8, 3

    class Stub(torch.nn.Module):
        is_causal = True
        num_key_value_groups = heads // kv_heads

    encoder = fta.methods.prefix.PrefixEncoder(1, kv_heads, d, n_prefix, 16, None, 1.0)
    stub = Stub()
    object.__setattr__(stub, "_fta_prefix", (encoder, 0))
    q, k, v = torch.randn(batch, heads, n, d), torch.randn(batch, kv_heads, n, d), torch.randn(batch, kv_heads, n, d)
    out, _ = prefix_attention(stub, q, k, v, None, scaling=d**-0.5)  # [batch, n, heads, d]
    rep = lambda t: t.repeat_interleave(heads // kv_heads, dim=-3)  # noqa: E731
    expected, lam = _gated_form(q, rep(k), rep(v), rep(encoder.prefix_keys[0]), rep(encoder.prefix_values[0]), causal=True)
    assert torch.allclose(out, rearrange(expected, "b h n d -> b n h d"), atol=1e-5)
    assert (lam > 0.01).all() and (lam < 0.99).all()  # the gate is neither closed nor saturated


def _capture(model, inputs: dict, outputs: dict):
    """Context-free capture with try/finally: module outputs (``outputs``) and module inputs (``inputs``)."""
    seen, handles = {}, []
    for key, module in outputs.items():
        handles.append(module.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(key, o.detach())))
    for key, module in inputs.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, key=key: seen.__setitem__(key, a[0].detach())))
    return seen, handles


def test_prefix_tuned_gpt2_attention_equals_the_gated_form():
    model = make_tiny("gpt2")
    prefix = fta.methods.PrefixTuning(n_prefix=4)
    adapted = prefix.apply(model, copy=True)
    attn = adapted.transformer.h[1].attn
    seen, handles = _capture(adapted, {"z": attn.c_proj}, {"qkv": attn.c_attn})
    try:
        adapted(input_ids=torch.randint(5, 200, (2, 9)))
    finally:
        for h in handles:
            h.remove()
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=4) for t in seen["qkv"].split(32, dim=-1))
    pk, pv = prefix.prefixes(adapted)[1]
    expected, _ = _gated_form(q, k, v, pk, pv, causal=True)
    assert torch.allclose(seen["z"], rearrange(expected, "b h n d -> b n (h d)"), atol=1e-5)


def test_prefix_tuned_llama_attention_equals_the_gated_form_after_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_tiny("llama")
    prefix = fta.methods.PrefixTuning(n_prefix=3, hidden=16)
    adapted = prefix.apply(model, copy=True)
    attn = adapted.model.layers[0].self_attn
    seen, handles = _capture(adapted, {"z": attn.o_proj}, {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj})
    ids = torch.randint(5, 200, (2, 8))
    try:
        adapted(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    q = rearrange(seen["q"], "b n (h d) -> b h n d", h=4)
    k, v = (rearrange(seen[x], "b n (h d) -> b h n d", h=2) for x in "kv")
    cos, sin = adapted.model.rotary_emb(seen["v"], torch.arange(8)[None].expand(2, -1))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    pk, pv = prefix.prefixes(adapted)[0]
    rep = lambda t: t.repeat_interleave(2, dim=-3)  # noqa: E731  GQA: 4 query heads share 2 key/value heads
    expected, _ = _gated_form(q, rep(k), rep(v), rep(pk), rep(pv), causal=True)
    assert torch.allclose(seen["z"], rearrange(expected, "b h n d -> b n (h d)"), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_prefix_keeps_padding_and_causality_of_the_real_tokens(family):
    model = make_tiny(family)
    prefix = fta.methods.PrefixTuning(n_prefix=2)
    adapted = prefix.apply(model, copy=True)
    ids = torch.randint(5, 200, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = _out(adapted, ids, mask)[1, :5]
    alone = _out(adapted, ids[1:, :5], mask[1:, :5])[0]
    assert torch.allclose(padded, alone, atol=1e-5)
    assert not torch.allclose(_out(adapted, ids), _out(model, ids), atol=1e-3)  # not the identity
    if family != "bert":  # causal: a later token does not change earlier outputs
        changed = ids.clone()
        changed[:, -1] = 7
        assert torch.allclose(_out(adapted, changed)[:, :-1], _out(adapted, ids)[:, :-1], atol=1e-5)


def test_prefix_trains_only_the_prefix_and_composes_with_an_adapter_into_mam(tok):
    from ftanalysis.zoo.architectures import TinyConfig, build_model

    base = build_model(TinyConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64), tok, seed=0)
    prefix = fta.methods.PrefixTuning(n_prefix=4, hidden=8)
    adapted = prefix.apply(base, copy=True)
    assert sorted(n for n, _ in prefix.trainable_parameters(adapted)) == [
        "fta_prefix.embedding", "fta_prefix.mlp.0.bias", "fta_prefix.mlp.0.weight", "fta_prefix.mlp.2.bias", "fta_prefix.mlp.2.weight"
    ]
    with pytest.raises(ValueError, match="no dense form"):
        prefix.merge(adapted)
    with pytest.raises(ValueError, match="already carries"):
        fta.methods.LoRA(r=2).apply(adapted, copy=True)
    mam = fta.methods.Adapter(r=4, position="mlp", scaling=4.0)
    mam.apply(adapted)
    assert {n.split(".")[0] for n, _ in mam.trainable_parameters(adapted)} == {"fta_prefix", "transformer"}
    result = fta.finetune(base, tok, fta.tasks.make("copy"), fta.methods.PrefixTuning(n_prefix=4), steps=3, lr=1e-2, batch_size=4, eval_n=16, progress=False)
    assert result.history["train_loss"].notna().all()


def test_prefix_bad_input():
    with pytest.raises(ValueError, match="'n_prefix'"):
        fta.methods.PrefixTuning(n_prefix=0)
    with pytest.raises(TypeError, match="'layers'"):
        fta.methods.PrefixTuning(layers=1)
    adapted = fta.methods.PrefixTuning(n_prefix=2).apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match="already carries"):
        fta.methods.PrefixTuning(n_prefix=2).apply(adapted)
