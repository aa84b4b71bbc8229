"""Forgetting probes: retention table, per-layer linear probes, grad x weight pruning, reverse fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes import (
    fit_logistic,
    neuron_scores,
    probe_layers,
    prune_neurons,
    remove_neurons,
    retention,
    reverse_finetune,
)


def test_retention_against_base(tok):
    base = make_tiny("gpt2")
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.transformer.h[1].mlp.c_proj.weight.mul_(3.0)
    result = retention(ft, tok, base=base, n=16)
    frame = result.to_frame()
    assert list(frame["task"]) == [t.name for t in fta.tasks.make("pretraining_mix").tasks]
    assert {"accuracy", "loss", "base_accuracy", "base_loss", "retained", "loss_increase"} <= set(frame.columns)
    assert torch.allclose(torch.tensor(frame["loss_increase"].to_numpy()), torch.tensor((frame["loss"] - frame["base_loss"]).to_numpy()))
    same = retention(base, tok, base=base, n=16, task=fta.tasks.make("counting"))
    assert same.frame["loss_increase"].abs().max() < 1e-6 and len(same.frame) == 1
    result.plot()


def test_fit_logistic_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g, dtype=torch.float64) * 4
    y = torch.arange(90) % 3
    x = centers[y] + 0.3 * torch.randn(90, 6, generator=g, dtype=torch.float64)
    w, b = fit_logistic(x, y, 3, seed=0)
    assert float(((x @ w.T + b).argmax(1) == y).float().mean()) == 1.0
    w2, b2 = fit_logistic(x, y, 3, seed=0)
    assert torch.equal(w, w2) and torch.equal(b, b2)  # seeded and deterministic


def _embedding_only_model(token_id: int):
    """A tiny GPT-2 whose blocks add nothing and whose embedding of one token is a large, distinct direction.

    Its residual stream at every layer is the token + position embeddings, so the mean over positions holds
    ``count(token) / length`` along that direction: linearly decodable by construction.
    """
    model = make_tiny("gpt2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
        model.transformer.wte.weight.mul_(0.01)
        model.transformer.wpe.weight.mul_(0.01)
        direction = torch.randn(32, generator=g)
        model.transformer.wte.weight[token_id] = 5.0 * direction / direction.norm()
    return model


def test_probe_layers_reads_a_linearly_encoded_answer(tok):
    model = _embedding_only_model(tok.convert_tokens_to_ids("a"))
    task = fta.tasks.make("counting", token="a", length=(8, 8))
    result = probe_layers(model, tok, task, n_train=256, n_test=128, pooling="mean")
    frame = result.to_frame()
    assert list(frame["layer"]) == [0, 1, 2]
    assert frame["test_accuracy"].min() > 0.95
    assert frame["chance"].iloc[0] < 0.3
    control = probe_layers(model, tok, task, n_train=256, n_test=128, pooling="mean", shuffle_labels=True)
    assert control.to_frame()["test_accuracy"].max() < 0.4
    other = probe_layers(model, tok, fta.tasks.make("counting", token="b", length=(8, 8)), n_train=256, n_test=128, pooling="mean")
    assert other.best_test_accuracy < 0.6  # the count of a token the model does not encode is not readable
    assert len(result.probes_) == 3 and result.probes_[0][0].shape[0] == len(result.classes)


def test_neuron_scores_equal_the_derivative_of_a_neuron_gate(tok):
    model = make_tiny("gpt2")
    task = fta.tasks.make("counting")
    scores = neuron_scores(model, tok, task, n=16, batch_size=8)
    assert len(scores) == 2 * 64 and set(scores.columns) == {"layer", "neuron", "delta_loss"}
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    # independent check: multiply each neuron's activation by a gate s (=1) and take dL/ds by autograd
    gates = [torch.ones(64, requires_grad=True) for _ in range(2)]
    handles = [
        block.mlp.c_proj.register_forward_pre_hook(lambda _, args, s=s: (args[0] * s,))
        for block, s in zip(model.transformer.h, gates)
    ]
    try:
        batch = fta.tasks.collate(task.examples(16, "train"), tok)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        task.loss(logits, batch).backward()
    finally:
        for h in handles:
            h.remove()
    expected = torch.cat([-s.grad for s in gates])  # removing neuron j: s_j 1 -> 0, first-order change -dL/ds_j
    assert torch.allclose(torch.tensor(scores["delta_loss"].to_numpy(), dtype=torch.float32), expected, atol=1e-6)


def test_prune_neurons_removes_exactly_k_and_copies(tok):
    model = make_tiny("llama")
    task = fta.tasks.make("counting")
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    result = prune_neurons(model, tok, task, k=5, n=16)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    chosen = result.pruned
    assert len(chosen) == 5 and list(chosen["delta_loss"]) == sorted(result.scores["delta_loss"])[:5]
    view = fta.nn.ModelView(result.model)
    for layer, neuron in zip(chosen["layer"], chosen["neuron"]):
        assert view.get(f"layers.{layer}.mlp.down")[:, neuron].abs().max() == 0
    zeroed = sum(int((view.get(f"layers.{layer}.mlp.down").abs().sum(0) == 0).sum()) for layer in range(2))
    assert zeroed == 5
    random = prune_neurons(model, tok, task, k=5, n=16, criterion="random", seed=1)
    assert len(random.pruned) == 5
    importance = prune_neurons(model, tok, task, k=3, n=16, criterion="importance")
    assert set(importance.pruned["delta_loss"].abs()) == set(result.scores["delta_loss"].abs().nlargest(3))
    with pytest.raises(ValueError, match="out of range"):
        remove_neurons(model, [(0, 10_000)])


def test_reverse_finetune_counts_steps(tok):
    model = make_tiny("gpt2")
    task = fta.tasks.make("copy", length=(1, 1))
    done = reverse_finetune(model, tok, task, target=0.0, max_steps=5, eval_n=16)
    assert done.steps_to_target == 0 and len(done.history) == 1
    never = reverse_finetune(model, tok, task, target=1.0, max_steps=6, eval_every=3, eval_n=16, lr=1e-5)
    assert never.steps_to_target is None and list(never.history["step"]) == [0, 3, 6]
    facts = fta.tasks.make("facts", relations=("likes",))  # a memorisation task: val = train examples
    learned = reverse_finetune(model, tok, facts, target=0.9, max_steps=200, eval_every=20, eval_n=64, lr=1e-2, batch_size=32)
    assert learned.reached and learned.steps_to_target % 20 == 0 and learned.steps_to_target < 200
    assert learned.history["val_accuracy"].iloc[-1] >= 0.9 and learned.history["val_accuracy"].iloc[0] < 0.5
    assert not any(p.requires_grad is False for p in learned.model.parameters())
