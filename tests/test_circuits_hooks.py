"""Hooks on plain Hugging Face decoders: values against a manual recomputation from the weights, overwriting,
caching only what is asked for, and removal of every hook (also after an exception)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny

from ftanalysis.nn import ModelView
from ftanalysis.probes.circuits import ActivationCache, hook_names, hooks, run_with_cache, run_with_hooks
from ftanalysis.probes.circuits.hooks import _PATTERN_HOOKS

ATOL = 1e-5


def ids(seed=0, batch=2, seq=7):
    return torch.randint(3, 250, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_no_hooks(model):
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks"):
            assert len(getattr(module, attr, {})) == 0, f"{attr} left on {name or 'model'}"
    assert model.config._attn_implementation == "sdpa"
    assert len(_PATTERN_HOOKS) == 0
    assert len(torch.nn.modules.module._global_forward_hooks) == 0
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == 0


def manual_gpt2(model, x):
    """Every activation of a GPT-2 model recomputed from its weights (the ModelView (out, in) matrices)."""
    view = ModelView(model)
    h, dh = view.n_heads, view.d_head
    out = {}
    embed = model.transformer.wte.weight[x]  # [batch, pos, d_model]: rows of the embedding matrices
    pos_embed = model.transformer.wpe.weight[: x.shape[1]].expand_as(embed)
    out.update({"hook_embed": embed, "hook_pos_embed": pos_embed})
    resid = embed + pos_embed
    seq = x.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for layer, block in enumerate(model.transformer.h):
        out[f"layers.{layer}.hook_resid_pre"] = resid
        normed = block.ln_1(resid)
        bias = block.attn.c_attn.bias
        d = view.d_model
        q = normed @ view.get(f"layers.{layer}.attn.q").T + bias[:d]
        k = normed @ view.get(f"layers.{layer}.attn.k").T + bias[d : 2 * d]
        v = normed @ view.get(f"layers.{layer}.attn.v").T + bias[2 * d :]
        q, k, v = (t.reshape(*t.shape[:2], h, dh) for t in (q, k, v))  # [batch, pos, head, d_head]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        W_O = view.get(f"layers.{layer}.attn.o").reshape(view.d_model, h, dh)  # (out, in) -> [d_model, head, d_head]
        result = torch.einsum("bqhd,mhd->bqhm", z, W_O)  # each head's output [batch, pos, head, d_model]
        attn_out = z.reshape(*z.shape[:2], -1) @ view.get(f"layers.{layer}.attn.o").T + block.attn.c_proj.bias
        out[f"layers.{layer}.attn.hook_result"] = result
        mid = resid + attn_out
        mlp_out = block.mlp(block.ln_2(mid))
        post = block.mlp.act(block.mlp.c_fc(block.ln_2(mid)))  # neuron activations [batch, pos, d_mlp]
        masked = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)  # the eager mask is additive
        out.update({f"layers.{layer}.attn.hook_q": q, f"layers.{layer}.attn.hook_k": k, f"layers.{layer}.attn.hook_v": v,
                    f"layers.{layer}.attn.hook_attn_scores": masked, f"layers.{layer}.mlp.hook_post": post,
                    f"layers.{layer}.attn.hook_pattern": pattern, f"layers.{layer}.attn.hook_z": z,
                    f"layers.{layer}.hook_attn_out": attn_out, f"layers.{layer}.hook_resid_mid": mid,
                    f"layers.{layer}.hook_mlp_out": mlp_out, f"layers.{layer}.hook_resid_post": mid + mlp_out})
        resid = mid + mlp_out
    ln_f = model.transformer.ln_f
    scale = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + ln_f.eps)  # [batch, pos, 1]
    out["ln_final.hook_scale"] = scale
    out["ln_final.hook_normalized"] = (resid - resid.mean(-1, keepdim=True)) / scale * ln_f.weight + ln_f.bias
    return out


def rotate(x, cos, sin):
    """RoPE with Llama's rotate-half convention, written out: x [batch, pos, head, d], cos/sin [batch, pos, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def manual_llama(model, x):
    view = ModelView(model)
    h, kvh, dh = view.n_heads, view.n_kv_heads, view.d_head
    out = {}
    resid = model.model.embed_tokens.weight[x]  # [batch, pos, d_model]
    out["hook_embed"] = resid
    seq = x.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    positions = torch.arange(seq)[None].expand(x.shape[0], -1)
    cos, sin = model.model.rotary_emb(resid, positions)
    for layer, block in enumerate(model.model.layers):
        out[f"layers.{layer}.hook_resid_pre"] = resid
        normed = block.input_layernorm(resid)
        q = (normed @ view.get(f"layers.{layer}.attn.q").T).reshape(*x.shape, h, dh)
        k = (normed @ view.get(f"layers.{layer}.attn.k").T).reshape(*x.shape, kvh, dh)
        v = (normed @ view.get(f"layers.{layer}.attn.v").T).reshape(*x.shape, kvh, dh)
        qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
        kr, vr = kr.repeat_interleave(h // kvh, dim=2), v.repeat_interleave(h // kvh, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", qr, kr) / math.sqrt(dh)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, vr)
        W_O = view.get(f"layers.{layer}.attn.o").reshape(view.d_model, h, dh)  # [d_model, head, d_head]
        out[f"layers.{layer}.attn.hook_result"] = torch.einsum("bqhd,mhd->bqhm", z, W_O)
        attn_out = z.reshape(*x.shape, -1) @ view.get(f"layers.{layer}.attn.o").T
        mid = resid + attn_out
        mlp_out = block.mlp(block.post_attention_layernorm(mid))
        normed2 = block.post_attention_layernorm(mid)
        post = block.mlp.act_fn(block.mlp.gate_proj(normed2)) * block.mlp.up_proj(normed2)
        masked = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out.update({f"layers.{layer}.attn.hook_q": q, f"layers.{layer}.attn.hook_k": k, f"layers.{layer}.attn.hook_v": v,
                    f"layers.{layer}.attn.hook_attn_scores": masked, f"layers.{layer}.mlp.hook_post": post,
                    f"layers.{layer}.attn.hook_pattern": pattern, f"layers.{layer}.attn.hook_z": z,
                    f"layers.{layer}.hook_attn_out": attn_out, f"layers.{layer}.hook_resid_mid": mid,
                    f"layers.{layer}.hook_mlp_out": mlp_out, f"layers.{layer}.hook_resid_post": mid + mlp_out})
        resid = mid + mlp_out
    norm = model.model.norm
    scale = torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # RMS, [batch, pos, 1]
    out["ln_final.hook_scale"] = scale
    out["ln_final.hook_normalized"] = norm.weight * resid / scale
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_hook_matches_manual_recomputation(family):
    model = make_tiny(family)
    x = ids()
    reference = model(input_ids=x).logits
    with torch.no_grad():
        logits, cache = run_with_cache(model, x, names_filter=lambda name: True)
        manual = (manual_gpt2 if family == "gpt2" else manual_llama)(model, x)
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)  # caching patterns does not change the output
    assert set(cache) == set(hook_names(model)) == set(manual)
    for name, value in manual.items():
        torch.testing.assert_close(cache[name], value, atol=ATOL, rtol=0, msg=name)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_names_filter_caches_only_what_is_asked(family):
    model = make_tiny(family)
    x = ids()
    _, cache = run_with_cache(model, x, names_filter="layers.1.attn.hook_z")
    assert list(cache) == ["layers.1.attn.hook_z"]
    _, cache = run_with_cache(model, x, names_filter=["layers.0.hook_resid_pre", "layers.1.hook_mlp_out"])
    assert sorted(cache) == ["layers.0.hook_resid_pre", "layers.1.hook_mlp_out"]
    _, cache = run_with_cache(model, x, names_filter=lambda n: n.endswith("hook_z"))
    assert sorted(cache) == ["layers.0.attn.hook_z", "layers.1.attn.hook_z"]
    assert isinstance(cache, ActivationCache) and cache["z", 0] is cache["layers.0.attn.hook_z"]
    assert cache.stack("z").shape == (2, 2, 7, 4, 8)
    with pytest.raises(KeyError, match="names_filter"):
        cache["pattern", 0]
    _, nothing = run_with_cache(model, x)
    assert len(nothing) == 0
    _, last = run_with_cache(model, x, names_filter=["layers.0.attn.hook_z", "layers.0.attn.hook_pattern"], positions=[-1])
    assert last["z", 0].shape == (2, 1, 4, 8) and last["pattern", 0].shape == (2, 4, 1, 7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overwriting_z_equals_zeroing_the_output_projection_columns(family):
    model = make_tiny(family)
    x = ids()
    head = 2

    def kill(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    patched = run_with_hooks(model, x, fwd_hooks=[("layers.1.attn.hook_z", kill)])
    view = ModelView(model)
    W = view.get("layers.1.attn.o")
    W[:, head * view.d_head : (head + 1) * view.d_head] = 0
    view.set("layers.1.attn.o", W)
    torch.testing.assert_close(patched, model(input_ids=x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overwriting_the_pattern_changes_the_head_output(family):
    model = make_tiny(family)
    x = ids()

    def to_first_token(pattern, hook):
        new = torch.zeros_like(pattern)
        new[..., 0] = 1.0
        return new

    _, cache = run_with_cache(model, x, names_filter=["layers.0.attn.hook_z", "layers.0.attn.hook_v"],
                              fwd_hooks=[("layers.0.attn.hook_pattern", to_first_token)])
    v0 = cache["v", 0][:, :1].repeat_interleave(ModelView(model).n_heads // ModelView(model).n_kv_heads, dim=2)
    torch.testing.assert_close(cache["z", 0], v0.expand_as(cache["z", 0]), atol=ATOL, rtol=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overwriting_q_k_v_resid_and_mlp(family):
    model = make_tiny(family)
    x, other = ids(0), ids(1)
    _, source = run_with_cache(model, other, names_filter=lambda n: True)
    clean = model(input_ids=other).logits
    # the whole residual stream entering block 0, at every position, from the other input: its logits
    patched = run_with_hooks(model, x, fwd_hooks=[("layers.0.hook_resid_pre", lambda v, h: source["resid_pre", 0])])
    torch.testing.assert_close(patched, clean, atol=ATOL, rtol=0)
    # q, k and v of every layer from the other input, plus its MLP outputs: the other input's logits too
    hooks_ = [(f"layers.{ly}.{s}", lambda v, h: source[h.name]) for ly in range(2)
              for s in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "hook_mlp_out")]
    hooks_.append(("layers.0.hook_resid_pre", lambda v, h: source[h.name]))
    torch.testing.assert_close(run_with_hooks(model, x, fwd_hooks=hooks_), clean, atol=ATOL, rtol=0)
    # the last resid_post decides the logits alone
    last = run_with_hooks(model, x, fwd_hooks=[("layers.1.hook_resid_post", lambda v, h: source[h.name])])
    torch.testing.assert_close(last, clean, atol=ATOL, rtol=0)


def test_hooks_are_removed_after_normal_runs_and_exceptions():
    model = make_tiny("gpt2")
    x = ids()
    run_with_cache(model, x, names_filter=lambda n: True)
    assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, fwd_hooks=[("layers.0.attn.hook_pattern", lambda v, h: None), ("layers.1.attn.hook_z", lambda v, h: None)]):
            assert model.config._attn_implementation == "ftanalysis_hooked"
            raise RuntimeError("boom")
    assert_no_hooks(model)

    def bad(value, hook):
        raise RuntimeError("boom in a hook")

    with pytest.raises(RuntimeError, match="boom in a hook"):
        run_with_hooks(model, x, fwd_hooks=[("layers.0.attn.hook_pattern", bad)])
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="must return None or a tensor of shape"):
        run_with_hooks(model, x, fwd_hooks=[("layers.0.attn.hook_z", lambda v, h: v[:, :1])])
    assert_no_hooks(model)


def test_bad_hook_names():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="Unknown hook name"):
        run_with_cache(model, ids(), names_filter="layers.0.attn.hook_nope")
    with pytest.raises(ValueError, match="out of range for a model with 2 layers"):
        run_with_cache(model, ids(), names_filter="layers.5.attn.hook_z")
    with pytest.raises(TypeError, match=r"\(name, fn\) pair"):
        run_with_hooks(model, ids(), fwd_hooks=["layers.0.attn.hook_z"])
    with pytest.raises(ValueError, match="decoder families"):
        run_with_cache(make_tiny("bert"), ids(), names_filter="layers.0.attn.hook_z")
    assert_no_hooks(model)


def transformer_lens_bridge(model, tok, folder):
    """TransformerLens (>= 4) wrapped around a copy of the same random GPT-2, or skip if it is not installed."""
    pytest.importorskip("transformer_lens")
    bridge_module = pytest.importorskip("transformer_lens.model_bridge")
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return bridge_module.TransformerBridge.boot_transformers(str(folder), hf_model=copy.deepcopy(model),
                                                             tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")


def test_transformer_lens_agrees_on_the_same_random_gpt2(tok, tmp_path):
    """Optional oracle: TransformerLens' hook values and activation patching on the same random GPT-2."""
    from ftanalysis.probes.circuits import activation_patching, logit_diff

    model = make_tiny("gpt2", vocab_size=len(tok))
    bridge = transformer_lens_bridge(model, tok, tmp_path)
    import transformer_lens.patching as tl_patching

    x = ids()
    _, ours = run_with_cache(model, x, names_filter=lambda n: True)
    _, theirs = bridge.run_with_cache(x)
    for suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "hook_resid_pre",
                   "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        for layer in range(2):
            torch.testing.assert_close(ours[f"layers.{layer}.{suffix}"], theirs[f"blocks.{layer}.{suffix}"], atol=1e-4, rtol=0)
    corrupt = x.clone()
    corrupt[:, 2] = 9
    metric = logit_diff(torch.tensor([5, 6]), torch.tensor([50, 51]))
    _, clean_cache = bridge.run_with_cache(x)
    clean_m, corrupt_m = metric(bridge(x)).mean(), metric(bridge(corrupt)).mean()
    expected = tl_patching.get_act_patch_attn_head_out_by_pos(
        bridge, corrupt, clean_cache, lambda logits: (metric(logits).mean() - corrupt_m) / (clean_m - corrupt_m))
    torch.testing.assert_close(activation_patching(model, x, corrupt, metric).effect, expected.float(), atol=1e-4, rtol=0)


def test_transformerlens_block_names_are_aliases():
    """``blocks.{l}.attn.hook_z`` (TransformerLens) and ``layers.{l}.attn.hook_z`` select the same activation."""
    from ftanalysis.probes.circuits.hooks import run_with_cache, run_with_hooks

    model = make_tiny("llama")
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    _, ours = run_with_cache(model, ids, names_filter=["layers.1.attn.hook_z", "layers.0.hook_resid_post"])
    _, theirs = run_with_cache(model, ids, names_filter=["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"])
    assert sorted(theirs) == sorted(ours) == ["layers.0.hook_resid_post", "layers.1.attn.hook_z"]
    torch.testing.assert_close(theirs["blocks.1.attn.hook_z"], ours["layers.1.attn.hook_z"], atol=0, rtol=0)

    def zero_head(z, point):
        z[:, :, 0] = 0
        return z

    a = run_with_hooks(model, ids, fwd_hooks=[("layers.1.attn.hook_z", zero_head)])
    b = run_with_hooks(model, ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["blocks.0.attn.hook_rot_q", "blocks.1.mlp.hook_pre", "hook_tokens",
                                  "blocks.0.ln1.hook_scale"])
def test_transformerlens_hooks_without_a_counterpart_say_so(name):
    from ftanalysis.probes.circuits.hooks import run_with_cache

    message = "is a TransformerLens hook that this package does not provide.*attn.hook_z.*hook_embed"
    with pytest.raises(ValueError, match=message):
        run_with_cache(make_tiny("gpt2"), torch.tensor([[5, 6, 7]]), names_filter=[name])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_neuron_activations_are_the_down_projection_input(family):
    """``mlp.hook_post`` reads what the down projection receives, and zeroing neurons there equals zeroing the
    matching input columns of the down projection's weight."""
    model = make_tiny(family)
    view = ModelView(model)
    x = ids()
    seen = []
    down = view.wrapper("layers.1.mlp.down")
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    _, cache = run_with_cache(model, x, names_filter=["layers.1.mlp.hook_post"])
    handle.remove()
    torch.testing.assert_close(cache["layers.1.mlp.hook_post"], seen[0], atol=0, rtol=0)
    assert cache["layers.1.mlp.hook_post"].shape[-1] == view.get("layers.1.mlp.down").shape[1]  # d_mlp

    neurons = [0, 3, 5]

    def zero(post, point):
        post[..., neurons] = 0
        return post

    hooked = run_with_hooks(model, x, fwd_hooks=[("layers.1.mlp.hook_post", zero)])
    edited = copy.deepcopy(model)
    edited_view = ModelView(edited)
    W = edited_view.get("layers.1.mlp.down")  # (out, in): input columns are neurons
    W[:, neurons] = 0
    edited_view.set("layers.1.mlp.down", W)
    with torch.no_grad():
        torch.testing.assert_close(hooked, edited(input_ids=x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_scores_softmax_to_the_pattern_and_can_be_patched(family):
    model = make_tiny(family)
    x = ids()
    _, cache = run_with_cache(model, x, names_filter=["layers.0.attn.hook_attn_scores", "layers.0.attn.hook_pattern"])
    scores, pattern = cache["layers.0.attn.hook_attn_scores"], cache["layers.0.attn.hook_pattern"]
    assert (scores[0, 0, 0, 1:] == torch.finfo(scores.dtype).min).all()  # masked: the most negative float (TL: -inf)
    torch.testing.assert_close(torch.softmax(scores, dim=-1), pattern, atol=1e-6, rtol=0)

    def uniform_scores(s, point):  # equal scores -> a uniform pattern over the visible positions
        return torch.where(s == torch.finfo(s.dtype).min, s, torch.zeros_like(s))

    def uniform_pattern(p, point):
        visible = torch.ones_like(p).tril()
        return visible / visible.sum(-1, keepdim=True)

    a = run_with_hooks(model, x, fwd_hooks=[("layers.0.attn.hook_attn_scores", uniform_scores)])
    b = run_with_hooks(model, x, fwd_hooks=[("layers.0.attn.hook_pattern", uniform_pattern)])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    from ftanalysis.probes.circuits.hooks import _SCORE_HOOKS

    assert len(_SCORE_HOOKS) == 0  # removed on exit
