"""Layer and parameter selection: what trains at each step under HFT, LISA and gradient-mask tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from transformers import LlamaConfig, LlamaForCausalLM

import ftanalysis as fta

M = fta.methods


@pytest.fixture(scope="module")
def task():
    return fta.tasks.make("modular_arithmetic", op="+")


def _llama4():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _matrices(model):
    return dict(fta.nn.ModelView(model).matrices())


class _Recorder:
    """Wraps a method's ``after_step`` to record, at each step, a snapshot and what the method said trains."""

    def __init__(self, method, what):
        self.steps = []
        original = method.after_step

        def after_step(state):
            original(state)
            self.steps.append({"params": {n: p.detach().clone() for n, p in state.model.named_parameters()},
                               "matrices": _matrices(state.model), "what": copy.deepcopy(what(method))})

        method.after_step = after_step


# ---------------------------------------------------------------------------------------------- HFT
def test_hft_freezes_half_of_each_group_per_block():
    view = fta.nn.ModelView(_llama4())
    method = M.HFT(seed=3)
    frozen = method.draw(view, stage=0)
    mlp_counts = []
    for layer in range(4):
        attn = [n for n in frozen if n.startswith(f"layers.{layer}.attn")]
        mlp = [n for n in frozen if n.startswith(f"layers.{layer}.mlp")]
        assert len(attn) == 2
        mlp_counts.append(len(mlp))
    assert sorted(mlp_counts) == [1, 1, 2, 2]  # 2 of {gate, up, down} in half of the blocks, 1 in the others
    assert method.draw(view, 0) == frozen  # seeded
    draws = {tuple(method.draw(view, s)) for s in range(6)}
    assert len(draws) > 1  # redrawn per stage
    assert M.HFT(seed=4).draw(view, 0) != frozen or M.HFT(seed=5).draw(view, 0) != frozen
    gpt2 = fta.nn.ModelView(make_tiny("gpt2"))
    frozen = M.HFT().draw(gpt2, 0)
    for layer in range(2):
        assert len([n for n in frozen if n.startswith(f"layers.{layer}.attn")]) == 2
        assert len([n for n in frozen if n.startswith(f"layers.{layer}.mlp")]) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hft_trains_exactly_the_unfrozen_half_at_each_stage(family, tok, task):
    base = make_tiny(family)
    method = M.HFT(stage_steps=2, seed=1)
    recorder = _Recorder(method, lambda m: list(m.frozen_))
    result = fta.finetune(base, tok, task, method, steps=6, lr=1e-2, batch_size=8, weight_decay=0.1, progress=False, eval_n=8)
    previous = _matrices(base)
    stages = set()
    for record in recorder.steps:
        frozen = set(record["what"])
        stages.add(tuple(sorted(frozen)))
        for name, W in record["matrices"].items():
            if name in frozen:
                assert torch.equal(W, previous[name]), name  # GPT-2's fused q/k/v included
            else:
                assert not torch.equal(W, previous[name]), name
        previous = record["matrices"]
    assert len(stages) > 1
    merged = result.merged_model()
    assert type(merged) is type(base)
    for name, W in _matrices(merged).items():
        assert torch.equal(W, recorder.steps[-1]["matrices"][name])


def test_hft_train_rest_false_freezes_embeddings():
    model = M.HFT(train_rest=False).apply(make_tiny("llama"), copy=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("_proj.weight") for n in trainable)


def test_hft_bad_config():
    with pytest.raises(ValueError, match="'stage_steps'"):
        M.HFT(stage_steps=0)
    with pytest.raises(ValueError, match="'train_rest'"):
        M.HFT(train_rest="yes")


# ---------------------------------------------------------------------------------------------- LISA
def test_lisa_samples_blocks_every_k_steps_and_always_trains_embeddings(tok, task):
    base = _llama4()
    method = M.LISA(n_layers=2, interval=3, seed=7)
    recorder = _Recorder(method, lambda m: list(m.active_layers_))
    fta.finetune(base, tok, task, method, steps=9, lr=1e-2, batch_size=8, progress=False, eval_n=8)
    draws = [tuple(r["what"]) for r in recorder.steps]
    assert all(len(d) == 2 for d in draws)
    assert draws[0] == draws[1] == draws[2] and draws[3] == draws[4] == draws[5] and draws[6] == draws[7] == draws[8]
    assert len({draws[0], draws[3], draws[6]}) > 1  # the sample changes between periods
    assert [h["step"] for h in method.history_] == [0, 3, 6]
    assert [tuple(h["layers"]) for h in method.history_] == [draws[0], draws[3], draws[6]]
    assert [method.draw(4, p) for p in range(3)] == [list(d) for d in (draws[0], draws[3], draws[6])]  # seeded
    previous = {n: p.detach().clone() for n, p in base.named_parameters()}
    for record in recorder.steps:
        for name, value in record["params"].items():
            moved = not torch.equal(value, previous[name])
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                assert moved == (layer in record["what"]), (name, record["what"])
            else:  # embeddings, final norm, head
                assert moved, name
        previous = record["params"]


def test_lisa_is_reproducible_and_checks_n_layers():
    a, b, c = M.LISA(n_layers=1, seed=0), M.LISA(n_layers=1, seed=0), M.LISA(n_layers=1, seed=1)
    assert [a.draw(8, p) for p in range(10)] == [b.draw(8, p) for p in range(10)]
    assert [a.draw(8, p) for p in range(10)] != [c.draw(8, p) for p in range(10)]
    with pytest.raises(ValueError, match="'n_layers' parameter of LISA must be <= the model's 2 blocks"):
        M.LISA(n_layers=3).apply(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="'interval'"):
        M.LISA(interval=0)


# ---------------------------------------------------------------------------------------------- GMT
def test_gmt_masks_the_smallest_accumulated_gradients(tok, task):
    base = make_tiny("llama")  # no dropout: the recomputed gradient is the one the run saw
    method = M.GradientMaskTuning(mask_ratio=0.3, accumulation_steps=2)
    result = fta.finetune(base, tok, task, method, steps=2, lr=1e-3, batch_size=8, grad_clip=None, progress=False, eval_n=8)
    # the accumulated gradient, recomputed independently on a copy of the base
    model = copy.deepcopy(base).train()
    for step in range(2):
        batch = task.batch(tok, 8, step=step, split="train", seed=0)
        loss = task.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
        (loss / 2).backward()
    tuned = dict(result.model.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.abs().reshape(-1)
        n_masked = int(0.3 * g.numel())
        smallest = torch.argsort(g)[:n_masked]
        moved = (tuned[name].detach() != p.detach()).reshape(-1)
        assert not moved[smallest].any(), name  # masked entries did not move
        assert int(moved.sum()) >= g.numel() - n_masked - int((g == 0).sum()), name
    assert method.masked_fraction_ == [pytest.approx(0.3, abs=0.01)]


def test_gmt_global_scope_and_one_update_per_accumulation(tok, task):
    method = M.GradientMaskTuning(mask_ratio=0.5, accumulation_steps=3, scope="global")
    fta.finetune(make_tiny("llama"), tok, task, method, steps=7, lr=1e-3, batch_size=4, progress=False, eval_n=8)
    assert len(method.masked_fraction_) == 3  # updates after steps 3, 6 and the last (partial) one
    grads = [torch.tensor([0.1, -5.0, 0.2]), torch.tensor([[3.0, -0.05]])]
    keeps = method.masks(grads)
    assert keeps[0].tolist() == [False, True, True] and keeps[1].tolist() == [[True, False]]


def test_gmt_bad_config():
    with pytest.raises(ValueError, match="'mask_ratio'"):
        M.GradientMaskTuning(mask_ratio=1.0)
    with pytest.raises(ValueError, match="'accumulation_steps'"):
        M.GradientMaskTuning(accumulation_steps=0)
    with pytest.raises(ValueError, match="'scope'"):
        M.GradientMaskTuning(scope="row")


def test_registry_has_layer_selection_methods():
    assert {"hft", "lisa", "gmt"} <= set(fta.methods.available())
