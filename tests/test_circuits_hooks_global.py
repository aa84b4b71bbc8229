"""The hooks outside the per-layer residual stream: ``hook_embed``, ``hook_pos_embed``, ``ln_final.hook_scale``,
``ln_final.hook_normalized`` and the per-head ``attn.hook_result``. Each is read against plain torch forward hooks
or a recomputation from the weights, written against an edit of the model that has the same effect, and named
under both spellings (``layers.`` and TransformerLens' ``blocks.``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from test_circuits_hooks import assert_no_hooks
from transformers import LlamaConfig, LlamaForCausalLM

import ftanalysis as fta
from ftanalysis.nn import ModelView
from ftanalysis.probes.circuits import ActivationCache, act_name, hook_names, hooks, run_with_cache, run_with_hooks

ATOL = 1e-5
GLOBALS = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]


def ids(seed=0, batch=2, seq=7, high=250):
    return torch.randint(3, high, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zoo():
    return {name: fta.zoo.load(name)[0] for name in ("gpt2-tiny", "llama-tiny")}


def model_of(source, zoo):
    """A tiny random model of the conftest (``"gpt2"``, ``"llama"``, ...) or a shipped zoo model."""
    return zoo[source] if source in zoo else with_random_final_norm(make_tiny(source))


def with_random_final_norm(model):
    """The final norm's weight (and bias) are ones (zeros) at init, which would hide them: draw them at random."""
    norm = parts(model)[2]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
    return model


def parts(model):
    """The embedding, position embedding (or None), final norm and lm_head modules, found by hand."""
    bare = model.transformer if hasattr(model, "transformer") else model.model
    if hasattr(bare, "wte"):
        return bare.wte, bare.wpe, bare.ln_f, model.lm_head
    return bare.embed_tokens, None, bare.norm, model.lm_head


def plain_forward_hooks(model, x):
    """What the embedding modules return and what the final norm reads and returns, with plain torch hooks."""
    embed, pos_embed, norm, _ = parts(model)
    seen = {}

    def keep(key):
        return lambda module, args, output: seen.setdefault(key, output.detach().clone())

    def keep_norm(module, args, output):
        seen.update(norm_in=args[0].detach().clone(), normalized=output.detach().clone())

    handles = [embed.register_forward_hook(keep("embed")), norm.register_forward_hook(keep_norm)]
    if pos_embed is not None:
        handles.append(pos_embed.register_forward_hook(keep("pos_embed")))
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


SOURCES = ["gpt2", "llama", "qwen2", "mistral", "gpt2-tiny", "llama-tiny"]


@pytest.mark.parametrize("source", SOURCES)
def test_global_hooks_read_what_the_modules_compute(source, zoo):
    """hook_embed / hook_pos_embed equal the embedding modules' outputs (positions repeated over the batch);
    hook_scale is sqrt(var + eps) (LayerNorm) or sqrt(mean(x^2) + eps) (RMSNorm) of the final norm's input; the
    final norm's output is hook_normalized and lm_head(hook_normalized) gives the logits."""
    model = model_of(source, zoo)
    x = ids(high=min(250, model.config.vocab_size))
    logits_plain, seen = plain_forward_hooks(model, x)
    names = [n for n in hook_names(model) if n in GLOBALS]
    with torch.no_grad():
        logits, cache = run_with_cache(model, x, names_filter=names)
    torch.testing.assert_close(logits, logits_plain, atol=0, rtol=0)  # reading changes nothing
    embed, pos_embed, norm, lm_head = parts(model)
    torch.testing.assert_close(cache["embed"], seen["embed"], atol=0, rtol=0)
    torch.testing.assert_close(cache["embed"], embed.weight[x].detach(), atol=0, rtol=0)
    if pos_embed is None:
        assert "hook_pos_embed" not in names
    else:
        assert cache["pos_embed"].shape == cache["embed"].shape == (2, 7, ModelView(model).d_model)
        for row in range(x.shape[0]):
            torch.testing.assert_close(cache["pos_embed"][row], seen["pos_embed"][0], atol=0, rtol=0)
            torch.testing.assert_close(cache["pos_embed"][row], pos_embed.weight[:7].detach(), atol=0, rtol=0)
    resid = seen["norm_in"].double()
    if isinstance(norm, torch.nn.LayerNorm):
        expected = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + norm.eps)
    else:
        expected = torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert cache["scale"].shape == (2, 7, 1) and cache["scale"].dtype == torch.float32
    torch.testing.assert_close(cache["scale"].double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache["normalized"], seen["normalized"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lm_head(cache["normalized"]), logits, atol=ATOL, rtol=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("source", SOURCES)
def test_head_results_sum_to_the_attention_output(source, zoo):
    """sum over heads of hook_result + the output bias is hook_attn_out, and head h's result is its z through its
    d_head columns of W_O (the view's (out, in) matrix)."""
    model = model_of(source, zoo)
    view = ModelView(model)
    x = ids(high=min(250, model.config.vocab_size))
    names = [act_name(c, layer) for layer in range(view.n_layers) for c in ("result", "attn_out", "z")]
    with torch.no_grad():
        _, cache = run_with_cache(model, x, names_filter=names)
    for layer in range(view.n_layers):
        result = cache["result", layer]
        assert result.shape == (2, 7, view.n_heads, view.d_model)
        bias = getattr(view.module(f"layers.{layer}.attn.o"), "bias", None)
        total = result.sum(2) + (0 if bias is None else bias)
        torch.testing.assert_close(total, cache["attn_out", layer], atol=ATOL, rtol=0)
        W_O = view.get(f"layers.{layer}.attn.o")  # (d_model, n_heads * d_head)
        for head in (0, view.n_heads - 1):
            cols = W_O[:, head * view.d_head : (head + 1) * view.d_head]  # [d_model, d_head]
            torch.testing.assert_close(result[:, :, head], cache["z", layer][:, :, head] @ cols.T, atol=ATOL, rtol=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_zeroing_a_head_result_equals_zeroing_its_z(family):
    model = make_tiny(family)
    x = ids()
    head = 1

    def zero(value, point):
        value[:, :, head] = 0
        return value

    by_result = run_with_hooks(model, x, fwd_hooks=[("layers.1.attn.hook_result", zero)])
    by_z = run_with_hooks(model, x, fwd_hooks=[("layers.1.attn.hook_z", zero)])
    torch.testing.assert_close(by_result, by_z, atol=ATOL, rtol=0)
    assert (by_result - model(input_ids=x).logits).abs().max() > 1e-3  # the head mattered
    assert_no_hooks(model)


def llama_with_output_bias():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=300, attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.bias.normal_()  # zero at init: make the bias visible
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-bias"])
def test_written_head_results_become_the_attention_output(family):
    """The attention output is the sum of the returned results plus the bias: the other prompt's results give
    the other prompt's attention output, and returning a copy of the results changes nothing."""
    model = llama_with_output_bias() if family == "llama-bias" else make_tiny(family)
    if family == "gpt2":
        with torch.no_grad():
            model.transformer.h[0].attn.c_proj.bias.normal_()  # zero at init: make the bias visible
    x, other = ids(0), ids(1)
    reference = model(input_ids=x).logits
    same = run_with_hooks(model, x, fwd_hooks=[("layers.0.attn.hook_result", lambda v, p: v.clone())])
    torch.testing.assert_close(same, reference, atol=ATOL, rtol=0)
    _, source = run_with_cache(model, other, names_filter=["layers.0.attn.hook_result", "layers.0.hook_attn_out"])
    _, patched = run_with_cache(model, x, names_filter=["layers.0.hook_attn_out"],
                                fwd_hooks=[("layers.0.attn.hook_result", lambda v, p: source[p.name])])
    torch.testing.assert_close(patched["attn_out", 0], source["attn_out", 0], atol=ATOL, rtol=0)
    assert_no_hooks(model)


def test_head_result_refuses_an_adapter_on_the_output_projection():
    model = fta.methods.LoRA(r=2, target=["attn.o"]).apply(make_tiny("llama"), copy=True)
    with pytest.raises(ValueError, match="wrapped by an adapter.*merge"):
        run_with_cache(model, ids(), names_filter="layers.0.attn.hook_result")
    run_with_cache(model, ids(), names_filter="layers.0.attn.hook_z")  # other hooks still work
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_writing_the_embeddings_of_another_prompt_equals_running_it(family):
    model = make_tiny(family)
    x, other = ids(0), ids(1)
    _, source = run_with_cache(model, other, names_filter="hook_embed")
    patched = run_with_hooks(model, x, fwd_hooks=[("hook_embed", lambda v, p: source["embed"])])
    torch.testing.assert_close(patched, model(input_ids=other).logits, atol=ATOL, rtol=0)
    assert_no_hooks(model)


def test_writing_the_position_embeddings_equals_running_at_other_positions():
    """GPT-2: position embeddings of positions 5..11 written into a run at 0..6 equal running with position_ids
    5..11; the written value may differ per batch row."""
    model = make_tiny("gpt2")
    x = ids()
    wpe = model.transformer.wpe.weight.detach()
    shifted = wpe[5:12].expand(2, -1, -1).clone()
    patched = run_with_hooks(model, x, fwd_hooks=[("hook_pos_embed", lambda v, p: shifted)])
    positions = torch.arange(5, 12)[None].expand(2, -1)
    torch.testing.assert_close(patched, model(input_ids=x, position_ids=positions).logits, atol=ATOL, rtol=0)
    per_row = torch.stack([wpe[:7], wpe[5:12]])
    patched = run_with_hooks(model, x, fwd_hooks=[("hook_pos_embed", lambda v, p: per_row)])
    shifted_row = model(input_ids=x[1:], position_ids=positions[1:]).logits[0]
    torch.testing.assert_close(patched[1], shifted_row, atol=ATOL, rtol=0)
    torch.testing.assert_close(patched[0], model(input_ids=x[:1]).logits[0], atol=ATOL, rtol=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_writing_the_normalized_stream_changes_the_logits_as_lm_head_does(family):
    model = make_tiny(family)
    x = ids()
    new = torch.randn(2, 7, ModelView(model).d_model, generator=torch.Generator().manual_seed(3))
    patched = run_with_hooks(model, x, fwd_hooks=[("ln_final.hook_normalized", lambda v, p: new)])
    with torch.no_grad():
        torch.testing.assert_close(patched, model.lm_head(new), atol=0, rtol=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_writing_the_scale_recomputes_the_final_norm(family):
    """A new scale s' makes the final norm C(x) / s' * w + b: doubling the scale halves what the norm adds to
    its bias; a normalized hook registered before the scale hook sees the new value too; returning the scale
    unchanged changes nothing."""
    model = with_random_final_norm(make_tiny(family))
    x = ids()
    reference = model(input_ids=x).logits
    same = run_with_hooks(model, x, fwd_hooks=[("ln_final.hook_scale", lambda v, p: v.clone())])
    torch.testing.assert_close(same, reference, atol=ATOL, rtol=0)

    last = f"layers.{ModelView(model).n_layers - 1}.hook_resid_post"
    _, clean = run_with_cache(model, x, names_filter=[last, "ln_final.hook_normalized"])
    seen = {}

    def record(value, point):
        seen["normalized"] = value.detach().clone()

    fwd_hooks = [("ln_final.hook_normalized", record), ("ln_final.hook_scale", lambda v, p: 2 * v)]
    logits, cache = run_with_cache(model, x, names_filter=["ln_final.hook_normalized", "ln_final.hook_scale"],
                                   fwd_hooks=fwd_hooks)
    _, _, norm, lm_head = parts(model)
    resid = clean[last]
    if isinstance(norm, torch.nn.LayerNorm):  # GPT-2
        centred, eps, bias = resid - resid.mean(-1, keepdim=True), norm.eps, norm.bias.detach()
    else:  # RMSNorm: no centring, no bias
        centred, eps, bias = resid, norm.variance_epsilon, torch.zeros(resid.shape[-1])
    with torch.no_grad():
        scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        expected = centred / (2 * scale) * norm.weight + bias
        torch.testing.assert_close(cache["normalized"], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(seen["normalized"], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(cache["normalized"] - bias, (clean["normalized"] - bias) / 2, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits, lm_head(expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["scale"], 2 * scale, atol=ATOL, rtol=0)  # the cache sees the written scale
    assert_no_hooks(model)


def test_scale_hooks_under_an_ssf_wrapped_final_norm():
    """SSF wraps the final norm (gamma * norm(x) + beta): the scale is read from the norm inside, hook_normalized
    is the wrapper's output that lm_head reads, and a written scale still goes through the wrapper."""
    model = fta.methods.SSF(target=["attn.o"]).apply(make_tiny("gpt2"), copy=True)
    wrapper = model.transformer.ln_f
    norm = wrapper.base_layer
    assert isinstance(norm, torch.nn.LayerNorm)
    with torch.no_grad():  # identity at init: make gamma and beta visible
        wrapper.ssf_scale["full"].uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
        wrapper.ssf_shift["full"].normal_(generator=torch.Generator().manual_seed(2))
    gamma, beta = wrapper.gamma().detach(), wrapper.beta().detach()
    x = ids()
    names = ["layers.1.hook_resid_post", "ln_final.hook_scale", "ln_final.hook_normalized"]
    logits, cache = run_with_cache(model, x, names_filter=names)
    resid = cache["resid_post", 1]
    centred = resid - resid.mean(-1, keepdim=True)
    scale = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + norm.eps)
    torch.testing.assert_close(cache["scale"], scale, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = gamma * (centred / scale * norm.weight + norm.bias) + beta
        torch.testing.assert_close(cache["normalized"], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(model.lm_head(cache["normalized"]), logits, atol=ATOL, rtol=0)
    _, doubled = run_with_cache(model, x, names_filter="ln_final.hook_normalized",
                                fwd_hooks=[("ln_final.hook_scale", lambda v, p: 2 * v)])
    with torch.no_grad():
        expected = gamma * (centred / (2 * scale) * norm.weight + norm.bias) + beta
    torch.testing.assert_close(doubled["normalized"], expected, atol=ATOL, rtol=0)
    assert_no_hooks(model)


def test_pos_embed_on_rope_models_is_a_clear_error():
    for family in ("llama", "qwen2", "mistral"):
        model = make_tiny(family)
        assert "hook_pos_embed" not in hook_names(model)
        with pytest.raises(ValueError, match="RoPE models have no position embedding"):
            run_with_cache(model, ids(), names_filter="hook_pos_embed")
        with pytest.raises(ValueError, match="RoPE models have no position embedding"):
            run_with_hooks(model, ids(), fwd_hooks=[("hook_pos_embed", lambda v, p: v)])
        assert_no_hooks(model)


def test_names_cache_keys_and_order():
    model = make_tiny("gpt2")
    names = hook_names(model)
    assert names[:2] == ["hook_embed", "hook_pos_embed"]
    assert names[-2:] == ["ln_final.hook_scale", "ln_final.hook_normalized"]
    assert "layers.1.attn.hook_result" in names
    assert hook_names(make_tiny("llama"))[0] == "hook_embed" and "hook_pos_embed" not in hook_names(make_tiny("llama"))
    assert act_name("embed") == "hook_embed" and act_name("scale") == "ln_final.hook_scale"
    assert act_name("normalized") == "ln_final.hook_normalized" and act_name("pos_embed") == "hook_pos_embed"
    assert act_name("ln_final.hook_scale") == "ln_final.hook_scale"
    assert act_name("result", 2) == "layers.2.attn.hook_result"
    with pytest.raises(ValueError, match="global .* takes no layer"):
        act_name("embed", 0)
    with pytest.raises(ValueError, match="belongs to a layer"):
        act_name("z")

    _, cache = run_with_cache(model, ids(), names_filter=lambda n: n in GLOBALS or n.endswith("hook_result"))
    assert isinstance(cache, ActivationCache)
    assert sorted(cache) == sorted(GLOBALS + ["layers.0.attn.hook_result", "layers.1.attn.hook_result"])
    for short, full in [("embed", "hook_embed"), ("pos_embed", "hook_pos_embed"), ("scale", "ln_final.hook_scale"),
                        ("normalized", "ln_final.hook_normalized")]:
        assert cache[short] is cache[full]
    assert cache["result", 1] is cache["blocks.1.attn.hook_result"] is cache["layers.1.attn.hook_result"]
    assert cache.stack("result").shape == (2, 2, 7, 4, 32)
    with pytest.raises(KeyError, match="global"):
        cache.stack("embed")
    with pytest.raises(KeyError, match=r"cache\['result', layer\]"):
        cache["result"]
    _, last = run_with_cache(model, ids(), names_filter=GLOBALS + ["layers.0.attn.hook_result"], positions=[-1])
    assert last["embed"].shape == (2, 1, 32) and last["scale"].shape == (2, 1, 1)
    assert last["result", 0].shape == (2, 1, 4, 32)
    torch.testing.assert_close(last["normalized"], cache["normalized"][:, -1:], atol=0, rtol=0)


def test_transformerlens_spellings_are_aliases():
    """``blocks.{l}.attn.hook_result`` is ``layers.{l}.attn.hook_result``; the global names are TransformerLens'
    own; a global name with a layer prefix is an error that says how to spell it."""
    model = make_tiny("llama")
    x = ids()
    _, ours = run_with_cache(model, x, names_filter=["layers.1.attn.hook_result"])
    _, theirs = run_with_cache(model, x, names_filter=["blocks.1.attn.hook_result"])
    assert list(theirs) == list(ours) == ["layers.1.attn.hook_result"]
    torch.testing.assert_close(theirs["blocks.1.attn.hook_result"], ours["layers.1.attn.hook_result"], atol=0, rtol=0)

    def zero(value, point):
        value[:, :, 0] = 0
        return value

    a = run_with_hooks(model, x, fwd_hooks=[("layers.1.attn.hook_result", zero)])
    b = run_with_hooks(model, x, fwd_hooks=[("blocks.1.attn.hook_result", zero)])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for prefixed in ("layers.0.hook_embed", "blocks.0.ln_final.hook_scale"):
        with pytest.raises(ValueError, match="is a global hook"):
            run_with_cache(model, x, names_filter=prefixed)
    with pytest.raises(ValueError, match="Unknown hook name 'ln_final.hook_nope'.*global names"):
        run_with_cache(model, x, names_filter="ln_final.hook_nope")
    assert_no_hooks(model)


def test_bad_returns_exceptions_and_token_type_ids_leave_no_hook():
    model = make_tiny("gpt2")
    x = ids()
    bad_returns = [("hook_embed", lambda v, p: v[:, :1]), ("hook_pos_embed", lambda v, p: v[:1]),
                   ("ln_final.hook_scale", lambda v, p: v.squeeze(-1)), ("ln_final.hook_normalized", lambda v, p: 0.0),
                   ("layers.0.attn.hook_result", lambda v, p: v.sum(2))]
    for name, bad in bad_returns:
        with pytest.raises(ValueError, match=f"hook on '{name}' returned .* must return None or a tensor of shape"):
            run_with_hooks(model, x, fwd_hooks=[(name, bad)])
        assert_no_hooks(model)

    def boom(value, point):
        raise RuntimeError("boom in a scale hook")

    with pytest.raises(RuntimeError, match="boom in a scale hook"):
        run_with_hooks(model, x, fwd_hooks=[("ln_final.hook_scale", boom), ("hook_pos_embed", lambda v, p: None)])
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="token_type_ids"):
        run_with_cache(model, x, names_filter="hook_embed", token_type_ids=torch.zeros_like(x))
    assert_no_hooks(model)
    _, cache = run_with_cache(model, x, names_filter="hook_pos_embed", token_type_ids=torch.zeros_like(x))  # fine
    assert cache["pos_embed"].shape == (2, 7, 32)
    with hooks(model, fwd_hooks=[("hook_embed", lambda v, p: None)]):  # no hook anywhere once the context exits
        pass
    assert_no_hooks(model)


def test_hooks_not_asked_for_are_not_installed():
    """Only what is selected is hooked: a z-only run puts one pre-hook on the output projections and nothing on
    the embeddings or the final norm (hook_result, the costly one, is computed only when selected)."""
    model = make_tiny("gpt2")
    embed, pos_embed, norm, _ = parts(model)
    with hooks(model, fwd_hooks=[("layers.0.attn.hook_z", lambda v, p: None)]):
        o_proj = model.transformer.h[0].attn.c_proj
        assert len(o_proj._forward_pre_hooks) == 1 and len(o_proj._forward_hooks) == 0
        for module in (embed, pos_embed, norm, model.transformer):
            assert not module._forward_hooks and not module._forward_pre_hooks
    with hooks(model, fwd_hooks=[("layers.0.attn.hook_result", lambda v, p: None)]):
        assert len(model.transformer.h[0].attn.c_proj._forward_hooks) == 1
        assert not model.transformer.h[1].attn.c_proj._forward_hooks
    assert_no_hooks(model)


def test_gradients_flow_through_the_new_hooks():
    """With detach=False the cached result and normalized stream stay in the graph (attribution needs it)."""
    model = make_tiny("llama")
    names = ["hook_embed", "layers.0.attn.hook_result", "ln_final.hook_normalized"]
    _, cache = run_with_cache(model, ids(), names_filter=names, detach=False)
    cache["normalized"].sum().backward()
    assert model.model.layers[0].self_attn.o_proj.weight.grad is not None
    assert cache["result", 0].requires_grad and cache["embed"].requires_grad
    model.zero_grad()
    copy.deepcopy(model)  # nothing left on the model blocks copying
    assert_no_hooks(model)
