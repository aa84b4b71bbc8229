"""The LoRA family: rsLoRA and B-only LoRA, DoRA, CorDA (ipm / kpm) and Chain of LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.zoo.architectures import TinyConfig, build_model


@pytest.fixture()
def small(tok):
    return build_model(TinyConfig(arch="llama", n_layers=1, d_model=32, n_heads=2, d_mlp=64), tok, seed=0)


def _randomise(method, model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _one_step(method, model, ids, lr=1e-2):
    optimizer = method.make_optimizer(model, lr=lr)
    model.train()
    loss = model(input_ids=ids).logits.pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# ---------------------------------------------------------------------- rsLoRA and B-only
@pytest.mark.parametrize("r", [1, 4, 16])
def test_rslora_scales_by_alpha_over_sqrt_r(r):
    model = make_tiny("llama")
    plain, rs = fta.methods.LoRA(r=r, alpha=8), fta.methods.LoRA(r=r, alpha=8, rslora=True)
    assert plain.scaling == pytest.approx(8 / r) and rs.scaling == pytest.approx(8 / r**0.5)
    adapted = rs.apply(model, copy=True)
    _randomise(rs, adapted)
    layer = adapted.model.layers[1].mlp.down_proj
    expected = (8 / r**0.5) * layer.lora_B["full"] @ layer.lora_A["full"]
    assert torch.allclose(rs.delta_weights(adapted)["layers.1.mlp.down"], expected, atol=1e-6)


def test_b_only_lora_keeps_a_at_its_initialisation():
    model = make_tiny("gpt2")
    lora = fta.methods.LoRA(r=2, train_a=False, target=["attn.q", "mlp.up"])
    adapted = lora.apply(model, copy=True)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    _one_step(lora, adapted, torch.randint(5, 200, (2, 7)))
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_B." in n for n in changed)
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if ".lora_A." in n)
    assert any(torch.count_nonzero(p) for n, p in adapted.named_parameters() if ".lora_A." in n)  # A is random, not 0


# ---------------------------------------------------------------------- DoRA
def test_dora_forward_is_the_decomposed_weight_with_a_detached_norm():
    """An independent computation of one layer: y = x (m * V / ||V||_row)^T + b, V = W0 + s B A, ||V|| constant."""
    model = make_tiny("llama")
    dora = fta.methods.DoRA(r=3, alpha=6, target="layers.0.mlp.up")
    adapted = dora.apply(model, copy=True)
    _randomise(dora, adapted)
    layer = adapted.model.layers[0].mlp.up_proj
    x = torch.randn(4, 32)
    y = layer(x)
    y.pow(2).sum().backward()
    A = layer.lora_A["full"].detach().clone().requires_grad_(True)
    B = layer.lora_B["full"].detach().clone().requires_grad_(True)
    m = layer.lora_magnitude["full"].detach().clone().requires_grad_(True)
    W0 = layer.base_layer.weight.detach()
    V = W0 + 2.0 * B @ A
    norm = V.detach().norm(dim=1)
    reference = x @ (m[:, None] * V / norm[:, None]).T
    assert torch.allclose(y, reference, atol=1e-5)
    reference.pow(2).sum().backward()
    for ours, theirs in ((layer.lora_A["full"], A), (layer.lora_B["full"], B), (layer.lora_magnitude["full"], m)):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)
    # with the norm in the graph, the gradient of B would differ: the test can tell the two apart
    B2 = B.detach().clone().requires_grad_(True)
    V2 = W0 + 2.0 * B2 @ A.detach()
    (x @ (m.detach()[:, None] * V2 / V2.norm(dim=1)[:, None]).T).pow(2).sum().backward()
    assert not torch.allclose(B2.grad, B.grad, atol=1e-4)


def test_dora_trains_magnitude_and_merges_to_a_plain_model():
    model = make_tiny("gpt2")
    dora = fta.methods.DoRA(r=2, target=["attn.k", "mlp.down"])
    adapted = dora.apply(model, copy=True)
    kinds = {n.split(".")[-2] for n, _ in dora.trainable_parameters(adapted)}
    assert kinds == {"lora_A", "lora_B", "lora_magnitude"}
    ids = torch.randint(5, 200, (2, 8))
    assert torch.allclose(adapted(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    _randomise(dora, adapted)
    merged = dora.merge(adapted)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    W0 = fta.nn.ModelView(model).get("layers.0.attn.k")
    Wm = fta.nn.ModelView(merged).get("layers.0.attn.k")
    m = dora.magnitudes(adapted)["layers.0.attn.k"]
    assert torch.allclose(Wm.norm(dim=1), m.abs(), atol=1e-5)  # merged rows have norm |m|
    assert torch.equal(fta.nn.ModelView(merged).get("layers.0.attn.q"), fta.nn.ModelView(model).get("layers.0.attn.q"))
    assert not torch.allclose(Wm, W0)


def test_dora_conflicts_with_lora():
    adapted = fta.methods.DoRA(r=2).apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match="already carries DoRA"):
        fta.methods.LoRA(r=2).apply(adapted)


# ---------------------------------------------------------------------- CorDA
def _calibration_inputs(model, path, batches):
    """The inputs of one module over the real tokens of ``batches`` (independent of CorDA's hooks)."""
    seen = []
    module = model.get_submodule(path)
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        handle.remove()
    rows = [x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]
    return torch.cat(rows).double()  # [tokens, in]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_adapter_is_the_chosen_components_of_the_covariance_oriented_svd(small, tok, mode):
    task = fta.tasks.make("copy")
    batches = [task.batch(tok, 8, step=i) for i in range(3)]
    r, alpha = 3, 6
    corda = fta.methods.CorDA(r=r, alpha=alpha, mode=mode, target=["attn.v", "mlp.down"]).calibrate(small, batches)
    X = _calibration_inputs(small, "model.layers.0.mlp.down_proj", batches)
    C = X.T @ X / X.shape[0]
    assert corda.calibration_tokens_ == X.shape[0]
    assert torch.allclose(corda.covariances_["model.layers.0.mlp.down_proj"], C, rtol=1e-6, atol=1e-9)
    adapted = corda.apply(small, copy=True)
    ids = batches[0]["input_ids"]
    assert torch.allclose(adapted(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-4)  # residual + BA = W
    # independent SVD of W C' (C' = C + 0.01 mean(diag C) I)
    W = fta.nn.ModelView(small).get("layers.0.mlp.down").double()
    Cd = C + 0.01 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    U, S, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
    pick = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    expected = U[:, pick] @ torch.diag(S[pick]) @ Vh[pick] @ torch.linalg.inv(Cd)
    delta = corda.delta_weights(adapted)["layers.0.mlp.down"].double()
    assert torch.allclose(delta, expected, atol=1e-4)
    assert torch.allclose(corda.singular_values_["layers.0.mlp.down"].double(), S.float().double(), rtol=1e-4)
    residual = fta.nn.ModelView(adapted).get("layers.0.mlp.down").double()
    assert torch.allclose(residual + delta, W, atol=1e-5)


def test_corda_calibrates_through_finetune_on_the_task_or_the_mix(small, tok):
    task = fta.tasks.make("copy")
    ipm = fta.finetune(small, tok, task, fta.methods.CorDA(r=2, n_batches=2, batch_size=4), steps=2, batch_size=4, eval_n=16, progress=False)
    assert ipm.method.calibration_source_ == "task:copy"
    kpm = fta.finetune(small, tok, task, fta.methods.CorDA(r=2, mode="kpm", n_batches=2, batch_size=4), steps=2, batch_size=4, eval_n=16, progress=False)
    assert kpm.method.calibration_source_ == "task:pretraining_mix"
    assert ipm.merged_model() is not None and len(kpm.history) == 1
    # a user calibration is kept
    own = fta.methods.CorDA(r=2, n_batches=1).calibrate(small, [torch.randint(5, 100, (2, 6))])
    fta.finetune(small, tok, task, own, steps=1, batch_size=4, eval_n=16, progress=False)
    assert own.calibration_source_ == "user" and own.calibration_tokens_ == 12


def test_corda_bad_input(small):
    with pytest.raises(ValueError, match="CorDA"):
        fta.methods.LoRA(init="corda")
    with pytest.raises(ValueError, match="'mode'"):
        fta.methods.CorDA(mode="svd")
    with pytest.raises(ValueError, match="needs calibration"):
        fta.methods.CorDA(r=2).apply(small, copy=True)
    with pytest.raises(TypeError, match="input_ids"):
        fta.methods.CorDA(r=2).calibrate(small, [[1, 2, 3]])
    with pytest.raises(ValueError, match="no calibration tokens"):
        fta.methods.CorDA(r=2).calibrate(small, [])
    corda = fta.methods.CorDA(r=2, target="attn.q").calibrate(small, [torch.randint(5, 100, (2, 6))])
    corda.target = "mlp.up"
    with pytest.raises(ValueError, match="calibrated on other layers"):
        corda.apply(small, copy=True)


# ---------------------------------------------------------------------- Chain of LoRA
def test_chain_restart_merges_resets_and_keeps_the_function():
    model = make_tiny("llama")
    chain = fta.methods.ChainLoRA(r=2, target="attn.q", restart_every=5)
    adapted = chain.apply(model, copy=True)
    ids = torch.randint(5, 200, (2, 7))
    optimizer = _one_step(chain, adapted, ids)
    assert len(optimizer.state) == 4  # A and B of two layers
    before = adapted(input_ids=ids).logits.detach()
    delta = chain.delta_weights(adapted)["layers.0.attn.q"]
    W_before = fta.nn.ModelView(adapted).get("layers.0.attn.q")
    chain.restart(adapted, optimizer, seed=0)
    assert torch.allclose(adapted(input_ids=ids).logits, before, atol=1e-5)
    assert torch.allclose(fta.nn.ModelView(adapted).get("layers.0.attn.q"), W_before + delta, atol=1e-6)
    assert all(torch.count_nonzero(B) == 0 for layer in chain.lora_layers(adapted).values() for B in layer.lora_B.values())
    assert len(optimizer.state) == 0 and chain.links_ == 2


def test_chain_of_lora_reaches_rank_above_r_through_finetune(small, tok):
    chain = fta.methods.ChainLoRA(r=1, target="mlp.up", restart_every=4)
    result = fta.finetune(small, tok, fta.tasks.make("copy"), chain, steps=12, lr=3e-2, batch_size=8, eval_n=16, progress=False)
    assert result.method.links_ == 3
    delta = fta.nn.ModelView(result.merged_model()).get("layers.0.mlp.up") - fta.nn.ModelView(small).get("layers.0.mlp.up")
    S = torch.linalg.svdvals(delta)
    assert int((S > 1e-4 * S[0]).sum()) == 3  # three links of rank 1
    plain = fta.finetune(small, tok, fta.tasks.make("copy"), fta.methods.LoRA(r=1, target="mlp.up"), steps=12, lr=3e-2, batch_size=8, eval_n=16, progress=False)
    S1 = torch.linalg.svdvals(fta.nn.ModelView(plain.merged_model()).get("layers.0.mlp.up") - fta.nn.ModelView(small).get("layers.0.mlp.up"))
    assert int((S1 > 1e-4 * S1[0]).sum()) == 1


def test_chain_bad_input():
    with pytest.raises(ValueError, match="'restart_every'"):
        fta.methods.ChainLoRA(restart_every=0)
    with pytest.raises(ValueError, match="no LoRA layer"):
        fta.methods.ChainLoRA().restart(make_tiny("gpt2"))
