"""Path patching, circuits (mean ablation, faithfulness, random control), DCM, CMAP, captum attributions,
plots and the entity-tracking helpers, on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import make_tiny

from ftanalysis.nn import ModelView
from ftanalysis.probes.circuits import (
    Circuit,
    activation_patching,
    captum_attributions,
    cmap,
    dcm,
    evaluate_circuit,
    logit_diff,
    mean_head_outputs,
    path_patching,
    run_circuit,
    run_with_cache,
    run_with_hooks,
)
from ftanalysis.probes.circuits.entity import corrupt_binding, corrupt_query, desiderata, entity_batch
from ftanalysis.probes.circuits.plots import head_heatmap, position_bars


def pair(seed=0, batch=3, seq=6):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 250, (batch, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(3, 250, (batch,), generator=g)
    return clean, corrupt


METRIC = logit_diff(torch.tensor([5, 6, 7]), torch.tensor([50, 51, 52]))


def naive_path_patching(model, clean, corrupt, metric, sender, receivers, receiver_input, receiver_pos):
    """Wang et al.'s three steps for one sender, one forward pass each, written without batching."""
    names = [f"layers.{ly}.attn.hook_z" for ly in range(2)]
    clean_logits, clean_cache = run_with_cache(model, clean, names_filter=names)
    _, corrupt_cache = run_with_cache(model, corrupt, names_filter=names)

    def freeze(value, hook):
        z = clean_cache[hook.name].clone()
        if hook.layer == sender[0]:
            z[:, :, sender[1]] = corrupt_cache[hook.name][:, :, sender[1]]
        return z

    name = f"layers.{receivers[0][0]}.attn.hook_{receiver_input}"
    _, recorded = run_with_cache(model, clean, names_filter=[name], fwd_hooks=[(n, freeze) for n in names])

    def receive(value, hook):
        v = value.clone()
        for _, head in receivers:
            v[:, receiver_pos, head] = recorded[name][:, receiver_pos, head]
        return v

    patched = run_with_hooks(model, clean, fwd_hooks=[(name, receive)])
    corrupt_logits = model(input_ids=corrupt).logits
    c, x, p = (metric(t).mean().item() for t in (clean_logits, corrupt_logits, patched))
    return (p - c) / (c - x)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("receiver_input", ["q", "v"])
def test_path_patching_matches_the_three_steps_written_out(family, receiver_input):
    model = make_tiny(family)
    clean, corrupt = pair()
    receivers = [(1, 0), (1, 3)] if receiver_input == "q" else [(1, 0)]
    result = path_patching(model, clean, corrupt, METRIC, receivers=receivers, receiver_input=receiver_input,
                           receiver_positions=[5] if receiver_input == "q" else [2], batch_size=6)
    assert result.effect.shape == (2, 4) and torch.isnan(result.effect[1]).all()  # layer-1 senders cannot reach layer 1
    for head in range(4):
        if family == "llama" and receiver_input == "v":
            continue  # a llama receiver patches its whole key/value head group; the naive version does not
        expected = naive_path_patching(model, clean, corrupt, METRIC, (0, head), receivers, receiver_input, 5 if receiver_input == "q" else 2)
        assert result.effect[0, head].item() == pytest.approx(expected, abs=1e-5)
    assert result.top(1)[0] in [(0, h) for h in range(4)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_path_patching_to_the_logits_from_the_last_layer_is_reverse_activation_patching(family):
    model = make_tiny(family)
    clean, corrupt = pair()
    paths = path_patching(model, clean, corrupt, METRIC, receiver_input="logits", normalize=False)
    # base = clean, sender corrupted everywhere == activation patching with the roles of the inputs swapped
    reverse = activation_patching(model, corrupt, clean, METRIC, per_position=False, normalize=False)
    torch.testing.assert_close(paths.effect[1], reverse.effect[1], atol=1e-5, rtol=0)
    assert not torch.isnan(paths.effect).any()
    frozen = path_patching(model, clean, corrupt, METRIC, receiver_input="logits", normalize=False, freeze_mlps=True)
    assert frozen.effect.shape == (2, 4)


def test_path_patching_errors():
    model = make_tiny("gpt2")
    clean, corrupt = pair()
    with pytest.raises(ValueError, match="needs a non-empty list"):
        path_patching(model, clean, corrupt, METRIC, receiver_input="q")
    with pytest.raises(ValueError, match="must be one of"):
        path_patching(model, clean, corrupt, METRIC, receivers=[(1, 0)], receiver_input="z")
    with pytest.raises(ValueError, match="head 7 is out of range"):
        path_patching(model, clean, corrupt, METRIC, receivers=[(1, 7)])
    with pytest.raises(ValueError, match="takes no 'receivers'"):
        path_patching(model, clean, corrupt, METRIC, receivers=[(1, 0)], receiver_input="logits")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_circuit_with_every_head_everywhere_is_the_full_model(family):
    model = make_tiny(family)
    x, _ = pair(batch=8)
    reference = torch.randint(3, 250, (16, 6), generator=torch.Generator().manual_seed(5))
    full = Circuit({"all": [(ly, h) for ly in range(2) for h in range(4)]})
    means = mean_head_outputs(model, reference)
    torch.testing.assert_close(run_circuit(model, x, full, means), model(input_ids=x).logits, atol=1e-5, rtol=0)
    # an empty-at-every-position circuit (a role that selects nothing) is every head set to its mean
    nowhere = Circuit({"all": full.groups["all"]}, positions={"all": "none"})
    none_mask = torch.zeros(8, 6, dtype=torch.bool)
    ablated = run_circuit(model, x, nowhere, means, roles={"none": none_mask})
    by_hand = run_with_hooks(model, x, fwd_hooks=[(f"layers.{ly}.attn.hook_z", lambda v, h: means[h.layer][None].expand_as(v)) for ly in range(2)])
    torch.testing.assert_close(ablated, by_hand, atol=1e-5, rtol=0)
    answers = model(input_ids=x).logits[:, -1].argmax(-1)
    evaluation = evaluate_circuit(model, x, answers, full, reference, n_random=2)
    assert evaluation.full_accuracy == 1.0 and evaluation.faithfulness == 1.0
    assert len(evaluation.random_accuracies) == 2 and len(evaluation.to_frame()) == 3


def test_circuit_helpers_are_seeded_and_checked():
    circuit = Circuit({"mover": [(0, 1), (0, 2)], "fetcher": [(1, 3)]}, positions={"fetcher": "last"})
    a, b = circuit.random_like(2, 4, seed=3), circuit.random_like(2, 4, seed=3)
    assert a == b and a.sizes == circuit.sizes and a.positions == circuit.positions
    assert circuit.random_like(2, 4, seed=4) != a or circuit.random_like(2, 4, seed=5) != a
    excluded = circuit.random_like(2, 4, seed=0, exclude=True)
    assert not set(excluded.groups["mover"]) & set(circuit.groups["mover"])
    table = circuit.overlap(Circuit({"mover": [(0, 1)], "fetcher": [(1, 3), (1, 0)]}))
    assert table.set_index("group").loc["all", "shared"] == 2
    with pytest.raises(ValueError, match="groups that do not exist"):
        Circuit({"a": [(0, 1)]}, positions={"b": "last"})
    with pytest.raises(TypeError, match="pairs"):
        Circuit({"a": [0, 1]})
    model = make_tiny("gpt2")
    x, _ = pair(batch=4)
    with pytest.raises(ValueError, match="missing from 'roles'"):
        evaluate_circuit(model, x, torch.zeros(4, dtype=torch.long), circuit, x)
    with pytest.raises(ValueError, match="out of range"):
        evaluate_circuit(model, x, torch.zeros(4, dtype=torch.long), Circuit({"a": [(3, 0)]}), x)
    assert isinstance(circuit.plot(), plt.Figure)
    plt.close("all")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cmap_with_every_head_of_a_model_differing_only_in_one_value_matrix_gives_the_finetuned_model(family):
    base = make_tiny(family)
    view = ModelView(base)
    view.set("layers.1.attn.o", 30 * view.get("layers.1.attn.o"))  # head outputs that decide the argmax
    ft = copy.deepcopy(base)
    ModelView(ft).set("layers.1.attn.v", torch.randn(ModelView(ft).get("layers.1.attn.v").shape, generator=torch.Generator().manual_seed(1)))
    x, _ = pair(batch=12)
    answers = ft(input_ids=x).logits[:, -1].argmax(-1)  # the fine-tuned model is right by construction
    assert (base(input_ids=x).logits[:, -1].argmax(-1) != answers).any()
    every = Circuit({"layer 0": [(0, h) for h in range(4)], "layer 1": [(1, h) for h in range(4)]})
    result = cmap(base, ft, x, answers, every, n_random=1)
    table = result.table.set_index("group")
    assert result.ft_accuracy == 1.0
    assert table.loc["all", "accuracy"] == 1.0 and table.loc["all", "recovered"] == pytest.approx(1.0)
    same = cmap(base, base, x, answers, {"one": [(0, 1)]}, n_random=0)
    assert same.table.loc[0, "accuracy"] == same.base_accuracy


def test_cmap_rejects_different_architectures():
    with pytest.raises(ValueError, match="one architecture"):
        cmap(make_tiny("gpt2"), make_tiny("llama"), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long), {"a": [(0, 0)]})


def test_dcm_finds_heads_that_move_a_known_desideratum():
    model = make_tiny("gpt2")
    view = ModelView(model)
    view.set("layers.1.attn.o", 30 * view.get("layers.1.attn.o"))  # head outputs that decide the argmax
    g = torch.Generator().manual_seed(0)
    base, source = torch.randint(3, 250, (160, 6), generator=g), torch.randint(3, 250, (160, 6), generator=g)
    heads = [(1, h) for h in range(4)]
    # the target is what the model says when the whole group is patched from the source at the last position
    _, cache = run_with_cache(model, source, names_filter="layers.1.attn.hook_z")
    patch = lambda v, h: torch.cat([v[:, :-1], cache[h.name][:, -1:]], dim=1)  # noqa: E731
    target = run_with_hooks(model, base, fwd_hooks=[("layers.1.attn.hook_z", patch)])[:, -1].argmax(-1)
    moved = target != model(input_ids=base).logits[:, -1].argmax(-1)  # keep examples where patching matters
    base, source, target = base[moved], source[moved], target[moved]
    result = dcm(model, base, source, target, heads, base_positions=-1, epochs=3, batch_size=16, lr=0.1, lam=0.0)
    assert result.all_heads_accuracy == 1.0 and result.no_patch_accuracy == 0.0  # mask 0 = full patch, 1 = none
    assert result.accuracy >= 0.5
    assert len(result.selected_) >= 1 and len(result.to_frame()) == 4
    with pytest.raises(ValueError, match="three positive fractions"):
        dcm(model, base, source, target, heads, base_positions=-1, split=(0.5, 0.5, 0.0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_captum_integrated_gradients_match_our_own_riemann_sum(family, tok):
    model = make_tiny(family, vocab_size=len(tok))
    prompt = "the cup is in box A , the map is in box B . box A contains the"
    target = "cup"
    att = captum_attributions(model, tok, prompt, target, n_steps=48)
    assert att.scores.shape == (2, 4) and att.per_position.shape == (2, 19, 4) and att.target == target
    # integrated gradients on layer 1's head outputs, written with our hooks: midpoint rule, 200 steps
    ids = torch.tensor([tok(prompt)["input_ids"]])
    base_ids = ids.clone()
    base_ids[:, 1:] = tok.pad_token_id
    name = "layers.1.attn.hook_z"
    _, a = run_with_cache(model, ids, names_filter=name)
    _, a0 = run_with_cache(model, base_ids, names_filter=name)
    steps = 200  # every point of the path in one batch
    alphas = (torch.arange(steps) + 0.5) / steps
    points = (a0[name] + alphas[:, None, None, None] * (a[name] - a0[name])).requires_grad_(True)  # [step, pos, head, d]
    logits = run_with_hooks(model, ids.repeat(steps, 1), fwd_hooks=[(name, lambda v, h: points)])
    (grad,) = torch.autograd.grad(logits[:, -1, tok.convert_tokens_to_ids(target)].sum(), [points])
    ours = ((a[name] - a0[name])[0] * grad.mean(0)).sum(-1)  # [pos, head]
    torch.testing.assert_close(att.per_position[1], ours, atol=2e-4, rtol=2e-3)
    assert all(p.grad is None for p in model.parameters())
    layers = captum_attributions(model, tok, prompt, target, level="layer", method="conductance", n_steps=8)
    assert layers.scores.shape == (2, 19)
    assert isinstance(att.plot(), plt.Figure) and isinstance(layers.plot(), plt.Figure)
    plt.close("all")
    with pytest.raises(ValueError, match="'level' parameter"):
        captum_attributions(model, tok, prompt, level="neuron")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        captum_attributions(model, tok, prompt, target="zebra-not-a-word")


def test_entity_helpers_and_plots(tok):
    batch = entity_batch(tok, 6, n_boxes=3)
    assert batch.ids.shape == (6, 26)
    for i in range(6):
        tokens = tok.convert_ids_to_tokens(batch.ids[i].tolist())
        assert tokens[batch.roles["previous query label"][i]] == tokens[-3] == batch.labels[i][batch.query[i]]
        assert tokens[batch.roles["object"][i]] == tok.convert_ids_to_tokens(int(batch.answers[i]))
    corrupt = corrupt_query(batch, tok, seed=1)
    assert (corrupt.query != batch.query).all() and (corrupt.ids[:, :-3] == batch.ids[:, :-3]).all()
    binding = corrupt_binding(batch, tok, seed=1)
    assert (binding.answers != batch.answers).all() and (binding.ids[:, -4:] == batch.ids[:, -4:]).all()
    assert sorted(binding.objects[0]) == sorted(batch.objects[0]) and binding.labels == batch.labels
    base, source, targets = desiderata(tok, 8, n_boxes=5, seed=2)
    assert set(targets) == {"positional", "object_value", "box_label_value"}
    stacked = torch.stack([base.answers, *targets.values()])
    assert all(len(set(stacked[:, i].tolist())) == 4 for i in range(8))  # four different answers
    assert (base.query != source.query).all()
    assert isinstance(head_heatmap(torch.randn(2, 4), title="t"), plt.Figure)
    assert isinstance(position_bars(torch.randn(5), list("abcde")), plt.Figure)
    model = make_tiny("gpt2", vocab_size=len(tok))
    result = activation_patching(model, batch.ids[:2], corrupt.ids[:2], logit_diff(batch.answers[:2], corrupt.answers[:2]), layers=[1])
    assert isinstance(result.plot(), plt.Figure)
    plt.close("all")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("receiver_input", ["logits", "q", "k", "v"])
def test_path_patching_skips_only_what_cannot_change(family, receiver_input, monkeypatch):
    import importlib

    module = importlib.import_module("ftanalysis.probes.circuits.path_patching")  # the module, not the function

    model = make_tiny(family)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(3, 250, (3, 9), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4] = torch.randint(3, 250, (3,), generator=g)  # nothing differs before position 4
    receivers = None if receiver_input == "logits" else [(1, 0), (1, 2)]
    kwargs = dict(receivers=receivers, receiver_input=receiver_input, batch_size=6, freeze_mlps=family == "gpt2")
    if receiver_input != "logits":
        kwargs["receiver_positions"] = [6, 8] if receiver_input == "q" else [5]
    for sender_positions in (None, [8], [2]):  # everywhere, the last position only, only where nothing changed
        reference = path_patching(model, clean, corrupt, METRIC, sender_positions=sender_positions, skip_unchanged=False, **kwargs)
        starts = []
        real = module._run_from
        monkeypatch.setattr(module, "_run_from", lambda *a, starts=starts, real=real, **kw: starts.append((a[4], a[5])) or real(*a, **kw))
        fast = path_patching(model, clean, corrupt, METRIC, sender_positions=sender_positions, **kwargs)
        monkeypatch.setattr(module, "_run_from", real)
        # float32: the clean run with a key/value cache and without one differ in the last bits (1e-5 with 2 threads)
        torch.testing.assert_close(fast.effect, reference.effect, atol=1e-4, rtol=0, equal_nan=True)
        late_sender = sender_positions == [8] and receiver_input in ("k", "v")  # its change comes after the receivers
        if sender_positions == [2] or late_sender:
            assert starts == [] and (fast.effect[~fast.effect.isnan()] == 0).all()  # no pass: nothing to carry
        else:
            assert starts and all(start >= (8 if sender_positions == [8] else 4) for start, _ in starts[:1])
            if sender_positions is None:  # the layer-1 senders (to the logits) or the step-3 passes skip block 0
                assert any(layer > 0 for _, layer in starts)


def test_path_patching_with_receivers_in_several_layers_skips_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64, vocab_size=300))
    clean, corrupt = pair(seq=7)
    receivers = [(1, 0), (3, 2)]  # senders in layers 1-2 reach only the layer-3 receiver
    for receiver_input in ("q", "v"):
        kwargs = dict(receivers=receivers, receiver_input=receiver_input, receiver_positions=[6], batch_size=6)
        fast = path_patching(model, clean, corrupt, METRIC, **kwargs)
        reference = path_patching(model, clean, corrupt, METRIC, skip_unchanged=False, **kwargs)
        # float32: the clean run with a key/value cache and without one differ in the last bits (1e-5 with 2 threads)
        torch.testing.assert_close(fast.effect, reference.effect, atol=1e-4, rtol=0, equal_nan=True)
        assert not fast.effect[:3].isnan().any() and fast.effect[3].isnan().all()
