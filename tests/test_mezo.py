"""MeZO: the SPSA estimate, its expectation on a quadratic, one step by hand, LoRA composition, memory helper."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from torch import nn

import ftanalysis as fta
from ftanalysis.memory import peak_memory
from ftanalysis.methods.sparse import mix_seed
from ftanalysis.train import TrainState

M = fta.methods


@pytest.fixture(scope="module")
def task():
    return fta.tasks.make("modular_arithmetic", op="+")


def _z(p, seed, index):
    """The perturbation written out: N(0, 1) from a generator seeded with mix_seed(step seed, parameter index)."""
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(mix_seed(seed, index)))


def _loss(model, task, tok, batch):
    return task.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)


def test_projected_gradient_is_the_central_difference_and_restores_theta(tok, task):
    model = make_tiny("gpt2")
    mezo = M.MeZO(eps=1e-2)
    mezo.apply(model)
    params = [p for _, p in mezo.trainable_parameters(model)]
    before = [p.detach().clone() for p in params]
    batch = task.batch(tok, 4, step=0, split="train", seed=0)
    g, lp, lm = mezo.projected_gradient(params, lambda: _loss(model, task, tok, batch), seed=11)
    for p, b in zip(params, before):
        assert torch.allclose(p, b, atol=1e-6)  # +eps, -2 eps, +eps round trip
    plus, minus = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for i, (pp, pm) in enumerate(zip([p for p in plus.parameters() if p.requires_grad], [p for p in minus.parameters() if p.requires_grad])):
            pp.add_(1e-2 * _z(pp, 11, i))
            pm.sub_(1e-2 * _z(pm, 11, i))
        l_plus, l_minus = float(_loss(plus, task, tok, batch)), float(_loss(minus, task, tok, batch))
    assert lp == pytest.approx(l_plus, abs=1e-5) and lm == pytest.approx(l_minus, abs=1e-5)
    assert g == pytest.approx((l_plus - l_minus) / (2 * 1e-2), rel=1e-3, abs=1e-4)


class _Quadratic(nn.Module):
    def __init__(self, n=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        Q = torch.randn(n, n, generator=g)
        self.register_buffer("A", Q @ Q.T / n + torch.eye(n))
        self.register_buffer("b", torch.randn(n, generator=g))
        self.theta = nn.Parameter(torch.randn(n, generator=g))

    def loss(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def grad(self):
        return (self.A @ self.theta + self.b).detach()


def test_expected_estimate_approaches_the_true_gradient_on_a_quadratic():
    q = _Quadratic()
    mezo = M.MeZO(eps=1e-3)
    params = [q.theta]
    estimates = []
    for seed in range(2000):
        g, _, _ = mezo.projected_gradient(params, q.loss, seed)
        estimates.append(g * _z(q.theta, seed, 0))
    true = q.grad()
    mean = torch.stack(estimates).mean(0)
    assert float(torch.nn.functional.cosine_similarity(mean, true, dim=0)) > 0.97
    assert float((mean - true).norm() / true.norm()) < 0.15
    few = torch.stack(estimates[:20]).mean(0)
    assert float(torch.nn.functional.cosine_similarity(few, true, dim=0)) < float(torch.nn.functional.cosine_similarity(mean, true, dim=0))


def test_one_step_equals_the_hand_computation(tok, task):
    model = make_tiny("llama")
    mezo = M.MeZO(eps=1e-3, seed=5)
    mezo.apply(model)
    assert mezo.make_optimizer(model, lr=0.1, weight_decay=0.01) is None
    names = [n for n, _ in mezo.trainable_parameters(model)]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = task.batch(tok, 4, step=3, split="train", seed=9)
    state = TrainState(step=3, steps=10, lr=0.1, model=model, optimizer=None, seed=9)
    loss = mezo.training_step(state, batch, lambda b: _loss(model, task, tok, b), grad_clip=1.0)
    seed = mix_seed(5, 9, 3)
    plus, minus = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for i, n in enumerate(names):
            dict(plus.named_parameters())[n].copy_(theta[n] + 1e-3 * _z(theta[n], seed, i))
            dict(minus.named_parameters())[n].copy_(theta[n] - 1e-3 * _z(theta[n], seed, i))
        l_plus, l_minus = float(_loss(plus, task, tok, batch)), float(_loss(minus, task, tok, batch))
    g = (l_plus - l_minus) / 2e-3
    assert mezo.last_projected_grad_ == pytest.approx(g, rel=1e-3, abs=1e-4)
    assert float(loss) == pytest.approx((l_plus + l_minus) / 2, abs=1e-5)
    for i, n in enumerate(names):
        p = dict(model.named_parameters())[n]
        decay = 0.01 if p.ndim >= 2 else 0.0
        expected = theta[n] * (1 - 0.1 * decay) - 0.1 * g * _z(theta[n], seed, i)
        assert torch.allclose(p.detach(), expected, atol=1e-5), n
        assert p.grad is None  # no backward pass


def test_mezo_with_lora_trains_only_the_adapters(tok, task):
    base = make_tiny("gpt2")
    lora = M.LoRA(r=2, target="attn.q")
    adapted = lora.apply(base, copy=True)
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            for B in layer.lora_B.values():
                B.normal_()
    result = fta.finetune(adapted, tok, task, M.MeZO(), steps=3, lr=1e-2, batch_size=4, progress=False, eval_n=8)
    assert result.trainable_parameters == sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
    before, after = dict(adapted.named_parameters()), dict(result.model.named_parameters())
    for n, p in after.items():
        assert torch.equal(p, before[n]) != ("lora_" in n), n
    merged = result.merged_model()
    assert type(merged) is type(base) and not any(isinstance(m, fta.methods.LoRALayer) for m in merged.modules())
    ids = torch.randint(5, 200, (2, 6))
    assert torch.allclose(merged(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5)


def test_mezo_alone_trains_everything_and_reduces_loss_on_average(tok, task):
    result = fta.finetune(make_tiny("gpt2"), tok, task, M.MeZO(eps=1e-3), steps=20, lr=5e-3, batch_size=16,
                          eval_every=10, progress=False, eval_n=8)
    assert result.trainable_parameters == sum(p.numel() for p in result.model.parameters())
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]


def test_mezo_bad_input():
    with pytest.raises(ValueError, match="'eps'"):
        M.MeZO(eps=0)
    model = M.Full().apply(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="already carries Full"):
        M.MeZO().apply(model)


# ---------------------------------------------------------------------------------------------- memory helper
def test_peak_memory_sees_a_64_mib_tensor():
    result = peak_memory(lambda: float(torch.ones(2**24).sum()), device="cpu")
    assert result.peak_bytes >= 60 * 2**20 and result.result == 2**24
    assert result.backend == "linux VmHWM"
    with pytest.raises(ValueError, match="'device'"):
        peak_memory(lambda: None, device="meta")

