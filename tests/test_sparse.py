"""Sparse fine-tuning: SparseDiff algebra and files, LT-SFT, SpIEL and LIFT against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.methods.sparse import SparseDiff, apportion, named_parameters
from ftanalysis.train import TrainState

M = fta.methods


@pytest.fixture(scope="module")
def task():
    return fta.tasks.make("modular_arithmetic", op="+")


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _random_diff(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for n, p in model.named_parameters():
        keep = torch.rand(p.shape, generator=g) < density
        deltas[n] = torch.randn(p.shape, generator=g) * keep
    return SparseDiff.from_dense(deltas)


# ---------------------------------------------------------------------------------------------- SparseDiff
def test_disjoint_diffs_compose_by_addition_in_either_order():
    base = make_tiny("gpt2")
    a = _random_diff(base, 0.05, seed=1)
    b_full = _random_diff(base, 0.05, seed=2)
    # make b disjoint from a
    b = SparseDiff(
        {n: i[~torch.isin(i, a.indices[n])] for n, i in b_full.indices.items()},
        {n: v[~torch.isin(b_full.indices[n], a.indices[n])] for n, v in b_full.values.items()},
        dict(b_full.shapes),
    )
    assert a.overlap(b) == 0 and a.nnz > 0 and b.nnz > 0
    ab = b.apply_to(a.apply_to(base, copy=True))
    ba = a.apply_to(b.apply_to(base, copy=True))
    summed = (a + b).apply_to(base, copy=True)
    for n, p in base.named_parameters():
        expected = p.detach() + a.to_dense(n) + b.to_dense(n)
        for m in (ab, ba, summed):
            assert torch.allclose(dict(m.named_parameters())[n], expected, atol=1e-6)
    assert (a + b).nnz == a.nnz + b.nnz


def test_add_sums_shared_entries_and_revert_undoes_apply():
    shapes = {"w": (2, 3)}
    a = SparseDiff({"w": torch.tensor([0, 4])}, {"w": torch.tensor([1.0, 2.0])}, shapes)
    b = SparseDiff({"w": torch.tensor([4, 5])}, {"w": torch.tensor([10.0, -1.0])}, shapes)
    s = a + b
    assert s.indices["w"].tolist() == [0, 4, 5] and s.values["w"].tolist() == [1.0, 12.0, -1.0]
    assert s.density == pytest.approx(3 / 6)
    assert torch.equal(s.to_dense("w"), torch.tensor([[1.0, 0, 0], [0, 12.0, -1.0]]))
    model = make_tiny("llama")
    before = _params(model)
    diff = _random_diff(model, 0.1, seed=3)
    diff.revert(diff.apply_to(model))
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6)


def test_save_load_roundtrip_and_between(tmp_path):
    base = make_tiny("gpt2")
    diff = _random_diff(base, 0.02, seed=4)
    path = diff.save(tmp_path / "phi.safetensors")
    loaded = SparseDiff.load(path)
    assert loaded.shapes == diff.shapes and loaded.nnz == diff.nnz
    for n in diff.shapes:
        assert torch.equal(loaded.indices[n], diff.indices[n]) and torch.equal(loaded.values[n], diff.values[n])
    tuned = diff.apply_to(base, copy=True)
    recovered = SparseDiff.between(base, tuned)
    for n in diff.shapes:
        assert torch.allclose(recovered.to_dense(n), diff.to_dense(n), atol=1e-6)
    frame = diff.to_frame()
    assert set(frame.columns) >= {"name", "nnz", "density"} and frame.nnz.sum() == diff.nnz


def test_sparse_diff_bad_input(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        SparseDiff({"w": torch.tensor([1, 1])}, {"w": torch.tensor([1.0, 2.0])}, {"w": (4,)})
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SparseDiff({"w": torch.tensor([4])}, {"w": torch.tensor([1.0])}, {"w": (4,)})
    with pytest.raises(ValueError, match="no parameter 'w'"):
        SparseDiff({"w": torch.tensor([0])}, {"w": torch.tensor([1.0])}, {"w": (4,)}).apply_to(make_tiny("gpt2"))
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SparseDiff.load(tmp_path / "x.safetensors")


def test_apportion_sums_exactly():
    assert sum(apportion(17, [10, 20, 30, 7])) == 17
    assert apportion(3, [1, 1, 1]) == [1, 1, 1]


# ---------------------------------------------------------------------------------------------- LT-SFT
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ltsft_diff_has_exactly_k_entries_and_everything_else_is_theta0(family, tok, task):
    base = make_tiny(family)
    method = M.LTSFT(count=300, phase1_steps=3)
    result = fta.finetune(base, tok, task, method, steps=6, lr=1e-2, batch_size=8, weight_decay=0.1, progress=False, eval_n=8)
    diff = method.diff(result.model)
    assert diff.nnz == 300 and int((torch.cat(list(diff.values.values())) != 0).sum()) == 300
    assert result.trainable_parameters == 300
    merged = result.merged_model()
    assert type(merged) is type(base)
    theta0 = _params(base)
    changed = 0
    for n, p in merged.named_parameters():
        d = (p.detach() - theta0[n]).reshape(-1)
        if n in diff.shapes:
            outside = torch.ones(d.numel(), dtype=torch.bool)
            outside[diff.indices[n]] = False
            assert torch.equal(d[outside], torch.zeros(int(outside.sum())))  # exactly theta0, weight decay included
            changed += int((d != 0).sum())
        else:  # embeddings: excluded, frozen in both phases
            assert torch.equal(p.detach(), theta0[n]), n
    assert changed == 300
    rebuilt = diff.apply_to(base, copy=True)  # theta0 + phi is the fine-tuned model
    for n, p in merged.named_parameters():
        assert torch.allclose(dict(rebuilt.named_parameters())[n], p, atol=1e-6)


def test_ltsft_selects_top_k_delta_rewinds_and_resets_the_optimizer():
    model = make_tiny("llama")
    method = M.LTSFT(density=0.1)
    method.apply(model)
    g = torch.Generator().manual_seed(0)
    params = named_parameters(model)
    with torch.no_grad():
        for u in method.units_:
            params[u.param].add_(torch.randn(params[u.param].shape, generator=g))
    deltas = np.concatenate([(params[u.param].detach() - method.theta0_[u.param]).abs().reshape(-1).numpy() for u in method.units_])
    k = int(round(0.1 * deltas.size))
    threshold = np.sort(deltas)[-k]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    optimizer.state[next(iter(model.parameters()))]["exp_avg"] = torch.ones(1)
    method.select_and_rewind(model, optimizer)
    chosen = np.concatenate([method.masks_[u.param].reshape(-1).numpy() for u in method.units_])
    assert chosen.sum() == k
    assert np.array_equal(chosen, deltas >= threshold)  # continuous values: no ties
    for u in method.units_:
        assert torch.equal(params[u.param].detach(), method.theta0_[u.param])
    assert len(optimizer.state) == 0
    assert method.trainable_count(model) == k


def test_ltsft_per_tensor_scope_keeps_each_tensors_share():
    model = make_tiny("gpt2")
    method = M.LTSFT(density=0.2, scope="tensor")
    method.apply(model)
    method.select_and_rewind(model)
    sizes = [method.theta0_[u.param].numel() for u in method.units_]
    expected = apportion(int(round(0.2 * sum(sizes))), sizes)
    assert [int(method.masks_[u.param].sum()) for u in method.units_] == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [({"density": 0.0}, "'density'"), ({"density": 1.5}, "'density'"), ({"density": -0.1}, "'density'"),
     ({"count": 0}, "'count'"), ({"density": 0.1, "count": 5}, "not both"), ({"scope": "row"}, "'scope'"),
     ({"phase1_steps": 0}, "'phase1_steps'")],
)
def test_ltsft_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        M.LTSFT(**kwargs)


def test_ltsft_bad_run_settings(tok, task):
    with pytest.raises(ValueError, match="phase1_steps < steps"):
        fta.finetune(make_tiny("gpt2"), tok, task, M.LTSFT(phase1_steps=5), steps=5, progress=False)
    method = M.LTSFT(count=10**9)
    method.apply(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="'count' parameter of LTSFT must be <="):
        method.n_selected()
    with pytest.raises(ValueError, match="no mask yet"):
        M.LTSFT().diff(make_tiny("gpt2"))


# ---------------------------------------------------------------------------------------------- SpIEL
def test_spiel_keeps_its_budget_and_regrows(tok, task):
    base = make_tiny("gpt2")
    method = M.SpIEL(density=0.05, update_every=3, accumulate_steps=2, drop_fraction=0.5)
    method.apply(base, copy=True)
    budget = method.budget()
    result = fta.finetune(base, tok, task, method, steps=10, lr=1e-2, batch_size=8, progress=False, eval_n=8)
    assert method.budget() == budget  # same number of active entries per matrix
    history = method.history()
    assert list(history.step) == [3, 6, 9] and (history.changed > 0).all()
    assert (history.drop_fraction.diff().dropna() < 0).all()  # linear decay
    diff = method.diff(result.model)  # dropped entries went back to theta0: the diff is the mask
    assert diff.nnz == sum(budget.values())
    assert result.trainable_parameters == sum(budget.values())


def test_spiel_reselection_grows_largest_gradient_and_reverts_dropped():
    model = make_tiny("llama")
    method = M.SpIEL(density=0.1, target="layers.0.attn.q", drop_fraction=0.5, update_every=4, accumulate_steps=1)
    method.apply(model)
    (unit,) = method.units_
    p = named_parameters(model)[unit.param]
    mask0 = method.masks_[unit.param].clone()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=g) * mask0)  # deltas on the active entries only
    grad = torch.randn(p.shape, generator=g)
    method.grad_sum_ = {unit.param: grad.clone()}
    method.reselect(model, None, step=4, steps=8)
    k = int(mask0.sum())
    n = int(round(0.5 * (1 - 4 / 8) * k))
    before = mask0.reshape(-1).numpy()
    after = method.masks_[unit.param].reshape(-1).numpy()
    dropped = np.flatnonzero(before & ~after)
    grown = np.flatnonzero(after & ~before)
    assert len(dropped) == len(grown) == n and after.sum() == k
    delta = (p.detach() - method.theta0_[unit.param]).reshape(-1).numpy()
    assert np.all(delta[dropped] == 0) and np.all(delta[grown] == 0)  # dropped return to theta0, grown start there
    inactive = np.flatnonzero(~before)
    expected_grown = inactive[np.argsort(-np.abs(grad.reshape(-1).numpy()[inactive]))[:n]]
    assert set(grown) == set(expected_grown)


def test_spiel_drop_order_matches_numpy():
    model = make_tiny("gpt2")
    method = M.SpIEL(density=0.2, target="layers.1.mlp.up", drop_fraction=0.4, update_every=2, accumulate_steps=1)
    method.apply(model)
    (unit,) = method.units_
    params = named_parameters(model)
    p = params[unit.param]
    mask0 = unit.view(method.masks_[unit.param]).clone()  # (out, in) canonical view of a Conv1D
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        unit.view(p.data).add_(torch.randn(mask0.shape, generator=g) * mask0)
    delta_before = (unit.view(p.detach()) - unit.view(method.theta0_[unit.param])).reshape(-1).numpy().copy()
    method.grad_sum_ = {unit.param: torch.randn(p.shape, generator=g)}
    method.reselect(model, None, step=2, steps=4)
    k = int(mask0.sum())
    n = int(round(0.4 * 0.5 * k))
    active = np.flatnonzero(mask0.reshape(-1).numpy())
    expected_dropped = set(active[np.argsort(np.abs(delta_before[active]))[:n]])
    mask1 = unit.view(method.masks_[unit.param]).reshape(-1).numpy()
    assert set(active[~mask1[active]]) == expected_dropped


def test_spiel_bad_config():
    with pytest.raises(ValueError, match="'accumulate_steps'"):
        M.SpIEL(update_every=3, accumulate_steps=5)
    with pytest.raises(ValueError, match="'drop_fraction'"):
        M.SpIEL(drop_fraction=1.5)
    with pytest.raises(ValueError, match="'density'"):
        M.SpIEL(density=0)
    with pytest.raises(ValueError, match="matches no weight matrix"):
        M.SpIEL(target="q_projection").apply(make_tiny("llama"))


# ---------------------------------------------------------------------------------------------- LIFT
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lift_mask_matches_numpy_principal_weights(family):
    model = make_tiny(family)
    method = M.LIFT(rank=3, density=0.1)
    method.apply(model, copy=True)
    view = fta.nn.ModelView(model)
    for unit in method.units_:
        W = view.get(unit.name).numpy().astype(np.float64)
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        approx = np.abs((U[:, :3] * S[:3]) @ Vt[:3])
        k = int(round(0.1 * W.size))
        expected = approx >= np.sort(approx.reshape(-1))[-k]
        got = unit.view(method.masks_[unit.param]).numpy()
        assert got.sum() == k
        assert (got == expected).mean() > 0.995, unit.name  # float32 vs float64 SVD may swap a near-tie


def test_lift_trains_only_principal_weights_and_lora_budget(tok, task):
    base = make_tiny("llama")
    method = M.LIFT(rank=2, lora_rank=1, target=["attn.q", "mlp.down"])
    result = fta.finetune(base, tok, task, method, steps=4, lr=1e-2, batch_size=8, progress=False, eval_n=8)
    view0, view1 = fta.nn.ModelView(base), fta.nn.ModelView(result.model)
    for unit in method.units_:
        out, inp = view0.get(unit.name).shape
        mask = unit.view(method.masks_[unit.param])
        assert int(mask.sum()) == min((out + inp) * 1, out * inp)
        delta = view1.get(unit.name) - view0.get(unit.name)
        assert torch.all(delta[~mask] == 0) and torch.any(delta[mask] != 0)
    for name in view0.matrix_names():
        if name not in {u.name for u in method.units_}:
            assert torch.equal(view0.get(name), view1.get(name))


def test_lift_refresh_keeps_left_entries_and_recomputes_mask(tok, task):
    base = make_tiny("gpt2")
    method = M.LIFT(rank=2, density=0.1, update_every=2)
    result = fta.finetune(base, tok, task, method, steps=5, lr=5e-2, batch_size=8, progress=False, eval_n=8)
    assert method.refreshes_ == 2
    fresh = method.compute_masks(result.model)
    diff = method.diff(result.model)
    assert diff.nnz >= sum(int(m.sum()) for m in fresh.values()) - 1  # union of the masks used
    merged = result.merged_model()
    ids = torch.randint(5, 200, (2, 6))
    assert torch.allclose(merged(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5)


def test_lift_bad_config():
    with pytest.raises(ValueError, match=r"'rank' parameter of LIFT must be <= min\(out, in\)"):
        M.LIFT(rank=33).apply(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="not both"):
        M.LIFT(density=0.1, lora_rank=2)
    with pytest.raises(ValueError, match="'density'"):
        M.LIFT(density=2.0)


def test_sparse_methods_leave_a_new_head_trainable():
    body = make_tiny("bert")
    model = fta.zoo.EncoderClassifier(body, n_classes=3)
    for method in (M.LTSFT(), M.SpIEL(), M.LIFT(rank=2)):
        adapted = method.apply(model, copy=True)
        trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
        assert {"head.weight", "head.bias"} <= trainable
        assert not any("embeddings.word_embeddings" in n for n in trainable)


def test_state_dict_roundtrip_restores_masks():
    model = make_tiny("gpt2")
    method = M.SpIEL(density=0.05)
    method.apply(model)
    other = M.SpIEL(density=0.05, seed=1)
    other.apply(make_tiny("gpt2"))
    other.load_state_dict(method.state_dict())
    for n in method.masks_:
        assert torch.equal(other.masks_[n], method.masks_[n])
    state = TrainState(step=0, steps=1, lr=0.0, model=model, optimizer=None, seed=0)
    method.before_step(state)  # sync is a no-op on CPU
