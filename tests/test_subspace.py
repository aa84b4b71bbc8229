"""Subspace training: Walsh-Hadamard and Fastfood against explicit matrices, DID / SAID, merge, d90."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from scipy.linalg import hadamard

import ftanalysis as fta
from ftanalysis.methods.subspace import DenseProjection, FastfoodProjection, d_threshold, fwht

M = fta.methods


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_fwht_matches_explicit_hadamard(n):
    x = torch.randn(3, n, dtype=torch.float64)
    H = torch.from_numpy(hadamard(n).astype(np.float64))
    assert torch.allclose(fwht(x), x @ H, atol=1e-10)
    assert torch.allclose(fwht(fwht(x)), n * x, atol=1e-9)  # H H = n I


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        fwht(torch.zeros(6))


def test_fastfood_is_h_g_pi_h_b():
    proj = FastfoodProjection(d=5, D=12, seed=0)
    L = proj.L
    assert L == 16
    H = torch.from_numpy(hadamard(L).astype(np.float32))
    Pi = torch.eye(L)[proj.Pi]  # (Pi v)_i = v[Pi[i]]
    explicit = H @ torch.diag(proj.G) @ Pi @ H @ torch.diag(proj.B)
    explicit = explicit[:12, :5] / proj.scale
    assert torch.allclose(proj.matrix(), explicit, atol=1e-5)
    x = torch.randn(5)
    assert torch.allclose(proj(x), explicit @ x, atol=1e-5)


@pytest.mark.parametrize("cls", [FastfoodProjection, DenseProjection])
@pytest.mark.parametrize("D", [1024, 1000])
def test_projection_statistics_and_seeding(cls, D):
    d = 64
    P = cls(d, D, seed=0).matrix()
    assert P.shape == (D, d)
    norms = P.norm(dim=0)
    assert abs(float(norms.pow(2).mean()) - 1.0) < 0.1  # unit expected column norm
    assert abs(float(P.mean())) < 3 / np.sqrt(D * d) * 3
    assert abs(float(P.var()) * D - 1.0) < 0.1  # entries of variance 1 / D
    gram = P.T @ P
    off = gram - torch.diag(torch.diag(gram))
    assert float(off.abs().max()) < 0.25  # nearly orthogonal columns
    assert torch.equal(cls(d, D, seed=0).matrix(), P)  # reproducible per seed
    assert not torch.allclose(cls(d, D, seed=1).matrix(), P)


def test_fastfood_handles_d_larger_than_D():
    proj = FastfoodProjection(d=40, D=8, seed=0)
    P = proj.matrix()
    assert P.shape == (8, 40) and torch.linalg.matrix_rank(P) == 8  # no silent truncation of theta_d


@pytest.mark.parametrize("projection", ["fastfood", "dense"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_subspace_weights_are_theta0_plus_p_theta(family, projection):
    base = make_tiny(family)
    ids = torch.randint(5, 200, (2, 7))
    method = M.Subspace(d=16, projection=projection, seed=2)
    model = method.apply(base, copy=True)
    assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)  # theta_d = 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fta_subspace.theta"]
    holder = method.subspace_parameters(model)
    with torch.no_grad():
        holder.theta.copy_(torch.randn(16) * 0.5)
    # an independent reconstruction of parameter i from the explicit projection matrix
    base_params = dict(base.named_parameters())
    for name in method.projected_[:6]:
        module_path, _, pname = name.rpartition(".")
        module = model.get_submodule(module_path)
        P = module.parametrizations[pname][0].projection.matrix()
        expected = base_params[name].detach() + (P @ holder.theta.detach()).view(base_params[name].shape)
        assert torch.allclose(getattr(module, pname), expected, atol=1e-5), name
    unmerged = model(input_ids=ids).logits
    merged = method.merge(model)
    assert type(merged) is type(base) and not hasattr(merged, "fta_subspace")
    assert torch.allclose(merged(input_ids=ids).logits, unmerged, atol=1e-5)
    if family == "gpt2":
        assert merged.lm_head.weight is merged.transformer.wte.weight  # the tie survives the merge
    assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-6)  # merging a copy left the original working


def test_said_has_one_scalar_per_tensor_and_checks_d(tok):
    base = make_tiny("llama")
    m = len(dict(base.named_parameters()))
    method = M.SAID(d=m + 10)
    model = method.apply(base, copy=True)
    holder = method.subspace_parameters(model)
    assert holder.theta.numel() == 10 and holder.lambdas.numel() == m
    assert torch.equal(holder.lambdas.detach(), torch.ones(m))
    assert sum(p.numel() for _, p in method.trainable_parameters(model)) == m + 10
    with torch.no_grad():
        holder.theta.normal_()
        holder.lambdas.zero_()
    ids = torch.randint(5, 200, (1, 5))
    assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)  # lambda = 0: theta0
    with pytest.raises(ValueError, match="must exceed the number of projected tensors"):
        M.SAID(d=m).apply(make_tiny("llama"))


def test_subspace_trains_through_finetune(tok):
    task = fta.tasks.make("modular_arithmetic", op="+")
    base = make_tiny("gpt2")
    result = fta.finetune(base, tok, task, M.Subspace(d=32), steps=4, lr=0.1, batch_size=8, progress=False, eval_n=8)
    assert result.trainable_parameters == 32
    theta = result.method.subspace_parameters(result.model).theta
    assert float(theta.detach().abs().sum()) > 0
    merged = result.merged_model()
    assert any(not torch.equal(p, q) for p, q in zip(merged.parameters(), base.parameters()))


def test_subspace_bad_input():
    with pytest.raises(ValueError, match="'d'"):
        M.Subspace(d=0)
    with pytest.raises(ValueError, match="'projection'"):
        M.Subspace(projection="sparse")
    with pytest.raises(ValueError, match="max_dense_entries"):
        M.Subspace(d=100, projection="dense", max_dense_entries=1000).apply(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="no subspace"):
        M.Subspace().merge(make_tiny("gpt2"))
    model = M.Subspace(d=4).apply(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="conflict|already carries"):
        M.Subspace(d=4).apply(model)


def test_d_threshold():
    assert d_threshold([10, 100, 1000], [0.2, 0.85, 0.95], full_metric=1.0) == 1000
    assert d_threshold([1000, 10, 100], [0.95, 0.2, 0.91], full_metric=1.0) == 100
    assert d_threshold([10, 100], [0.1, 0.2], full_metric=1.0) is None


def test_intrinsic_dimension_sweep_table(tok):
    task = fta.tasks.make("modular_arithmetic", op="+")
    result = M.intrinsic_dimension_sweep(make_tiny("gpt2"), tok, task, [4, 16], steps=2, lr=0.05, full_metric=0.5,
                                         batch_size=4, eval_n=8, progress=False)
    frame = result.to_frame()
    assert list(frame.d) == [4, 16] and {"accuracy", "fraction_of_full", "reached"} <= set(frame.columns)
    assert frame.attrs["d90"] == result.d90 == d_threshold([4, 16], list(frame.accuracy), 0.5)
    assert result.plot() is not None
