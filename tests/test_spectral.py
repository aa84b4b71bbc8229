"""Spectral probes: intruder dimensions (Shuttleworth et al. 2024), the streamed and cached report, scaling, overlap."""

from __future__ import annotations

import copy
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file

import ftanalysis as fta
from ftanalysis.probes import spectral as sp
from ftanalysis.probes import spectral_plots as plots


def decaying(n=128, m=None, seed=0, scale=5.0, decay=40.0):
    """``U diag(s) V^T`` with ``s_i = scale * exp(-i / decay)`` and random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    m = m or n
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = scale * torch.exp(-torch.arange(r, dtype=torch.float32) / decay)
    return (U * s) @ V.T, s


def unit(n, seed):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def spread(basis, seed):
    """A unit vector with equal |cos| = 1/sqrt(r) with every column of an orthonormal ``basis`` (m, r): in a tiny
    model a random direction is not reliably far from every singular vector of W0, this one is."""
    signs = torch.where(torch.rand(basis.shape[1], generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)
    v = basis @ signs
    return v / v.norm()


def perturbed(model, seed=0, noise=1e-3, spikes=()):
    """A copy of ``model`` with small dense noise on every matrix and rank-1 spikes (name, times sigma_1) added.

    A spike's directions are spread evenly over W0's singular vectors, so it is an intruder whenever it
    becomes a top-k direction of W1 (its |cos| with every base vector is 1/sqrt(min(out, in)) < 0.5)."""
    out = copy.deepcopy(model)
    view = fta.nn.ModelView(out)
    g = torch.Generator().manual_seed(seed)
    for name in view.matrix_names():
        W = view.get(name)
        view.set(name, W + noise * torch.randn(W.shape, generator=g))
    for i, (name, times) in enumerate(spikes):
        W = view.get(name)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        u, v = spread(U, 100 + i), spread(Vh.T, 200 + i)
        view.set(name, W + times * S[0] * torch.outer(u, v))
    return out


# ---------------------------------------------------------------------- the definition on matrices
def test_self_comparison_gives_no_intruder():
    W0, _ = decaying(256)
    result = fta.probes.intruder_dimensions(W0, W0)
    assert result.count == 0 and result.ranks == ()
    assert torch.allclose(result.max_cos, torch.ones(10), atol=1e-4)


@pytest.mark.parametrize("sd", [1e-3, 1e-2, 3e-2])
def test_dense_small_noise_gives_no_intruder(sd):
    W0, _ = decaying()
    W1 = W0 + sd * torch.randn(W0.shape, generator=torch.Generator().manual_seed(1))
    assert fta.probes.intruder_dimensions(W0, W1).count == 0


def test_planted_spike_is_exactly_one_intruder_at_rank_one():
    W0, s = decaying(256)
    v = unit(256, 3)
    result = fta.probes.intruder_dimensions(W0, W0 + 1.5 * s[0] * torch.outer(v, v))
    assert result.count == 1 and result.ranks == (1,)
    assert float(result.max_cos[0]) < 0.5 and bool((result.max_cos[1:] >= 0.5).all())
    # its singular value is about that of the spike (v is nearly orthogonal to W0's top directions)
    assert abs(float(result.singular_values[0]) - 1.5 * float(s[0])) < 0.2 * float(s[0])
    frame = result.to_frame()
    assert frame["intruder"].tolist() == [True] + [False] * 9 and frame["rank"].tolist() == list(range(1, 11))


def test_sign_flips_change_nothing():
    W0, s = decaying()
    W1 = W0 + 1.5 * s[0] * torch.outer(unit(128, 3), unit(128, 4))
    ref = fta.probes.intruder_dimensions(W0, W1)
    for a, b in [(-W0, W1), (W0, -W1), (-W0, -W1)]:
        other = fta.probes.intruder_dimensions(a, b)
        assert other.count == ref.count and other.ranks == ref.ranks
        assert torch.allclose(other.max_cos, ref.max_cos, atol=1e-5)
    # flipping the sign of individual singular vectors (columns) leaves every |cos| unchanged
    U0, _, _ = torch.linalg.svd(W0)
    U1, _, _ = torch.linalg.svd(W1)
    signs0 = torch.where(torch.rand(128, generator=torch.Generator().manual_seed(5)) < 0.5, -1.0, 1.0)
    signs1 = signs0[:10].flip(0)
    _, flipped = sp._max_abs_cos(U1[:, :10] * signs1, U0 * signs0)
    assert torch.allclose(flipped, ref.max_cos, atol=1e-5)


def test_max_cos_floor_is_one_over_sqrt_n_and_right_side_is_left_of_transpose():
    W0, s = decaying(n=64, m=96)
    W1 = W0 + 2 * s[0] * torch.outer(unit(96, 7), unit(64, 8))
    for side in ("left", "right"):
        assert float(fta.probes.intruder_dimensions(W0, W1, side=side).max_cos.min()) >= 1 / math.sqrt(96) - 1e-6
    right = fta.probes.intruder_dimensions(W0, W1, side="right")
    transposed_left = fta.probes.intruder_dimensions(W0.T, W1.T, side="left")
    assert right.count == transposed_left.count and torch.allclose(right.max_cos, transposed_left.max_cos, atol=1e-5)


def test_independent_numpy_computation():
    """The count of Algorithm 1 written out with numpy (float64) on a case with a few intruders."""
    W0, s = decaying(n=80, m=120, seed=2)
    W1 = W0 + sum(t * s[0] * torch.outer(unit(120, 10 + i), unit(80, 20 + i)) for i, t in enumerate([1.3, 0.6, 0.2]))
    U0 = np.linalg.svd(W0.double().numpy(), full_matrices=False)[0]
    U1 = np.linalg.svd(W1.double().numpy(), full_matrices=False)[0]
    for k, eps in [(10, 0.5), (5, 0.3), (20, 0.7)]:
        expected = np.abs(U1[:, :k].T @ U0).max(axis=1)
        result = fta.probes.intruder_dimensions(W0, W1, k=k, eps=eps)
        assert np.allclose(result.max_cos.numpy(), expected, atol=1e-4)
        assert result.count == int((expected < eps).sum()) and result.count >= 1


# ---------------------------------------------------------------------- the certified Gram route
def test_gram_route_gives_the_full_svd_count():
    """Many matrices, spikes of every size (some right at the threshold): the "auto" count equals the SVD count."""
    shapes = [(64, 64), (96, 48), (48, 96)]
    used_gram = 0
    for trial in range(18):
        m, n = shapes[trial % 3]
        W0, s = decaying(n=n, m=m, seed=trial, decay=10.0 + trial)
        times = [0.1, 0.4, 0.7, 1.0, 1.5][trial % 5]
        W1 = W0 + times * s[0] * torch.outer(unit(m, trial), unit(n, trial + 50)) + 1e-3 * torch.randn(m, n)
        for side in ("left", "right"):
            S0, B0 = sp.SVDCache().get(("t", trial), W0, side)
            exact, exact_cos = sp._probe(W0, W1, S0, B0, 10, 0.5, side, "svd")
            fast, fast_cos = sp._probe(W0, W1, S0, B0, 10, 0.5, side, "auto")
            assert ((exact_cos < 0.5) == (fast_cos < 0.5)).all()
            assert torch.allclose(exact_cos, fast_cos, atol=1e-3)
            used_gram += fast.path == "gram"
    assert used_gram >= 30  # the fast route is the one normally taken


def _clustered(m: int, n: int, seed: int) -> torch.Tensor:
    """A Gaussian matrix: its top singular values cluster at the Marchenko-Pastur edge (gaps of ~0.3%)."""
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("shape", [(600, 300), (300, 300), (300, 600)])
def test_lanczos_route_matches_the_svd(monkeypatch, shape):
    """Large matrices take the Lanczos route (no dense eigensolver) and agree with a float64 SVD."""
    monkeypatch.setattr(sp, "_top_eigh", lambda *a, **kw: pytest.fail("the dense eigensolver was used"))
    W = _clustered(*shape, seed=1)
    top = sp._topk_gram(W, 10, "left")
    U, S, _ = np.linalg.svd(W.double().numpy(), full_matrices=False)
    assert top is not None and top.path == "gram"
    assert np.allclose(top.sigma.numpy(), S[:10], rtol=1e-6)
    assert np.allclose(np.abs(np.sum(top.vectors.double().numpy() * U[:, :10], axis=0)), 1.0, atol=1e-5)
    assert float(top.bound.max()) < 1e-3


def test_rest_check_proves_only_true_top_eigenpairs():
    """The Cholesky certificate accepts the true top p eigenpairs and rejects a set that misses one."""
    W = _clustered(400, 300, seed=2).double().numpy()
    G = W.T @ W
    lam, X = np.linalg.eigh(G)
    lam, X = lam[::-1], X[:, ::-1]
    p, margin = 11, 1e-12
    below = lam[p] + 1e-9 * lam[0]  # just above the (p+1)-th eigenvalue
    assert sp._rest_is_below(G, True, lam[:p], np.asfortranarray(X[:, :p]), below, margin)
    assert not sp._rest_is_below(G, True, lam[:p], np.asfortranarray(X[:, :p]), lam[p] - 1e-6 * lam[0], margin)
    missing = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]  # the 4th eigenpair left out, the 12th in its place
    assert not sp._rest_is_below(G, True, lam[missing], np.asfortranarray(X[:, missing]), lam[11] - 1e-9 * lam[0], margin)


def test_lanczos_pairs_that_miss_an_eigenvalue_fall_back(monkeypatch):
    """If the iterative solver skipped an eigenvalue, the certificate fails and LAPACK's dense solver decides."""
    W = _clustered(600, 300, seed=3)
    good = sp._topk_gram(W, 10, "left")

    def skips_the_third(G, n_top, lower):
        lam, X = np.linalg.eigh(G if lower else G.T)  # only the lower triangle of the transposed upper one
        lam, X = lam[::-1], X[:, ::-1]
        keep = [i for i in range(n_top + 1) if i != 2]
        return lam[keep], np.asfortranarray(X[:, keep])

    used_dense = []
    dense = sp._top_eigh
    monkeypatch.setattr(sp, "_top_eigh_lanczos", skips_the_third)
    monkeypatch.setattr(sp, "_top_eigh", lambda *a: used_dense.append(1) or dense(*a))
    fixed = sp._topk_gram(W, 10, "left")
    assert used_dense and fixed is not None
    assert torch.allclose(fixed.sigma, good.sigma, rtol=1e-6)


def test_gram_route_falls_back_when_it_cannot_certify():
    W0, _ = decaying(n=32)
    W1 = torch.eye(32) * 3.0  # all singular values equal: no gap, vectors undetermined
    assert sp._topk_gram(W1, 4, "left") is None
    S0, B0 = sp.SVDCache().get("eye", W0, "left")
    top, _ = sp._probe(W0, W1, S0, B0, 4, 0.5, "left", "auto")
    assert top.path == "svd"
    # a vector whose max|cos| sits within its error bound of eps is recomputed by SVD
    W1 = W0 + 1.5 * torch.outer(unit(32, 1), unit(32, 2))
    gram = sp._topk_gram(W1, 4, "left")
    _, max_cos = sp._max_abs_cos(gram.vectors, B0)
    top, _ = sp._probe(W0, W1, S0, B0, 4, float(max_cos[0]), "left", "auto")
    assert top.path == "svd"


def test_singular_values_and_update_statistics():
    W, s = decaying(n=48, m=80, seed=4)
    assert torch.allclose(sp.singular_values(W), s, rtol=1e-4, atol=1e-6)
    stats = sp.update_statistics(torch.tensor([3.0, 1.0, 0.0]))
    p = np.array([0.75, 0.25])
    assert stats["stable_rank"] == pytest.approx(10 / 9)
    assert stats["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert stats["rank_energy"] == 1  # 9 / 10 of the energy is in the first value
    assert sp.update_statistics(torch.tensor([1.0, 1.0, 1.0, 1.0]))["rank_energy"] == 4
    assert sp.update_statistics(torch.zeros(5)) == {"stable_rank": 0.0, "effective_rank": 0.0, "rank_energy": 0}
    # a rank-3 update: effective rank <= 3 even through the Gram route (no noise floor from float32)
    low = sum(torch.outer(unit(80, i), unit(48, 9 + i)) * (3 - i) for i in range(3))
    assert sp.update_statistics(sp.singular_values(low))["effective_rank"] <= 3.0 + 1e-4
    spec = fta.probes.spectra(W, W + low)
    assert (spec.update[3:] < 1e-5).all() and set(spec.to_frame()["matrix"]) == {"W0", "W1", "dW"}


# ---------------------------------------------------------------------- models and checkpoints
def test_gpt2_conv1d_orientation_matches_manual_svds():
    base = make_tiny("gpt2")
    ft = perturbed(base, spikes=[("layers.0.attn.k", 1.5), ("layers.1.mlp.up", 1.5)])
    report = fta.probes.spectral_report(base, ft, k=5, cache=False).set_index("name")
    for layer in range(2):
        h0, h1 = base.transformer.h[layer], ft.transformer.h[layer]
        raw = {
            "attn.q": (h0.attn.c_attn.weight[:, :32], h1.attn.c_attn.weight[:, :32]),
            "attn.k": (h0.attn.c_attn.weight[:, 32:64], h1.attn.c_attn.weight[:, 32:64]),
            "attn.v": (h0.attn.c_attn.weight[:, 64:], h1.attn.c_attn.weight[:, 64:]),
            "attn.o": (h0.attn.c_proj.weight, h1.attn.c_proj.weight),
            "mlp.up": (h0.mlp.c_fc.weight, h1.mlp.c_fc.weight),
            "mlp.down": (h0.mlp.c_proj.weight, h1.mlp.c_proj.weight),
        }
        for kind, (a, b) in raw.items():
            W0, W1 = a.detach().T.double(), b.detach().T.double()  # Conv1D stores (in, out)
            U0 = torch.linalg.svd(W0, full_matrices=False)[0]
            U1 = torch.linalg.svd(W1, full_matrices=False)[0]
            max_cos = (U1[:, :5].T @ U0).abs().max(dim=1).values
            row = report.loc[f"layers.{layer}.{kind}"]
            assert (row["out"], row["in"]) == tuple(W0.shape)
            assert row["intruders"] == int((max_cos < 0.5).sum())
            assert np.allclose(row["max_cos"], max_cos.numpy(), atol=1e-4)
            assert row["dW_norm"] == pytest.approx(float((W1 - W0).norm()), rel=1e-4)
    assert report.loc["layers.0.attn.k", "intruders"] >= 1 and report.loc["layers.1.mlp.up", "intruders"] >= 1
    # the transposed (wrong) orientation would give another answer for the non-square up-projection
    W0, W1 = raw["mlp.up"][0].detach(), raw["mlp.up"][1].detach()
    wrong = fta.probes.intruder_dimensions(W0, W1, k=5)
    assert not np.allclose(wrong.max_cos.numpy(), report.loc["layers.1.mlp.up", "max_cos"], atol=1e-3)


STAT_COLUMNS = ["dW_norm", "dW_rel", "dW_sigma1", "stable_rank", "effective_rank", "min_max_cos"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_streamed_report_equals_in_memory_report(family, tmp_path):
    base = make_tiny(family)
    ft = perturbed(base, spikes=[("layers.1.attn.q", 1.5)])
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    memory = fta.probes.spectral_report(base, ft, k=5, cache=False, topk="svd")
    streamed = fta.probes.spectral_report(tmp_path / "base", tmp_path / "ft", k=5, cache=False)
    mixed = fta.probes.spectral_report(base, tmp_path / "ft" / "model.safetensors", k=5, cache=False)
    for other in (streamed, mixed):
        assert other["name"].tolist() == memory["name"].tolist()
        assert other["intruders"].tolist() == memory["intruders"].tolist()
        assert other["rank_energy"].tolist() == memory["rank_energy"].tolist()
        assert np.allclose(other[STAT_COLUMNS].to_numpy(), memory[STAT_COLUMNS].to_numpy(), rtol=1e-4, atol=1e-5)
    assert memory["intruders"].sum() >= 1


def test_our_checkpoints_without_config_and_with_prefixes(tmp_path):
    """A state dict with a prefix (EncoderClassifier's 'body.') and no config.json, as fta.cached_finetune writes."""
    body = make_tiny("bert")
    clf = fta.zoo.EncoderClassifier(copy.deepcopy(body), 2, seed=0)
    ft = fta.zoo.EncoderClassifier(perturbed(body, spikes=[("layers.0.mlp.down", 1.5)]), 2, seed=0)
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(tmp_path / "model.safetensors"))
    a = fta.probes.spectral_report(clf, ft, k=4, cache=False)
    b = fta.probes.spectral_report(body, tmp_path, k=4, cache=False)
    assert a["intruders"].tolist() == b["intruders"].tolist()
    assert a.set_index("name").loc["layers.0.mlp.down", "intruders"] >= 1


def test_cached_report_equals_uncached_and_skips_base_svds(tmp_path, monkeypatch):
    base = make_tiny("llama")
    ft1, ft2 = perturbed(base, seed=1, spikes=[("layers.0.attn.v", 1.5)]), perturbed(base, seed=2)
    base.save_pretrained(tmp_path / "base")
    cache = fta.probes.SVDCache()
    calls = []
    real_svd = sp._svd
    monkeypatch.setattr(sp, "_svd", lambda W: calls.append(tuple(W.shape)) or real_svd(W))
    uncached = fta.probes.spectral_report(base, ft1, cache=False, k=4)
    n_matrices = len(uncached)
    calls.clear()
    first = fta.probes.spectral_report(tmp_path / "base", ft1, cache=cache, k=4)
    assert cache.misses == n_matrices and cache.hits == 0 and len(calls) == n_matrices
    calls.clear()
    second = fta.probes.spectral_report(tmp_path / "base", ft2, cache=cache, k=4)
    assert cache.hits == n_matrices and len(calls) == 0  # no SVD of the base, none of W1 (certified Gram route)
    for a, b in [(uncached, first)]:
        assert a["intruders"].tolist() == b["intruders"].tolist()
        assert np.allclose(a[STAT_COLUMNS].to_numpy(), b[STAT_COLUMNS].to_numpy(), rtol=1e-5, atol=1e-6)
    assert second["intruders"].tolist() == fta.probes.spectral_report(base, ft2, cache=False, k=4)["intruders"].tolist()
    # a disk cache survives a new cache object; an in-memory model is keyed by its values
    disk = fta.probes.SVDCache(directory=tmp_path / "svd")
    fta.probes.spectral_report(base, ft1, cache=disk, k=4)
    again = fta.probes.SVDCache(directory=tmp_path / "svd")
    from_disk = fta.probes.spectral_report(base, ft1, cache=again, k=4)
    assert again.hits == n_matrices and from_disk["intruders"].tolist() == uncached["intruders"].tolist()
    changed = perturbed(base, seed=9)  # other values under the same names: must not hit
    fta.probes.spectral_report(changed, ft1, cache=again, k=4)
    assert again.misses == n_matrices


def test_modules_selection_and_summary():
    base = make_tiny("gpt2")
    ft = perturbed(base, spikes=[("layers.1.attn.v", 1.5)])
    report = fta.probes.spectral_report(base, ft, k=4, modules=["attn.v", "mlp"], cache=False)
    assert report["name"].tolist() == [f"layers.{layer}.{k}" for layer in range(2) for k in ("attn.v", "mlp.up", "mlp.down")]
    assert fta.probes.spectral_report(base, ft, k=4, modules=r"layers\.1\.attn\.[qv]", cache=False)["name"].tolist() == [
        "layers.1.attn.q", "layers.1.attn.v"]
    summary = fta.probes.summarize_report(report, "kind")
    assert summary["kind"].tolist()[-1] == "total"
    assert summary.set_index("kind").loc["total", "intruders"] == report["intruders"].sum()
    assert summary.set_index("kind").loc["attn.v", "with_intruders"] == 1
    recount = fta.probes.intruder_counts(report, k=2, eps=1.0)
    assert (recount == 2).all()  # every |cos| < 1 at eps = 1 (only an exact copy reaches 1)... within k
    with pytest.raises(ValueError, match="matches no weight matrix"):
        fta.probes.spectral_report(base, ft, modules="attn.x")
    with pytest.raises(ValueError, match="'by'"):
        fta.probes.summarize_report(report, "colour")


# ---------------------------------------------------------------------- PEFT as the oracle
peft = pytest.importorskip("peft")


def _peft_bert(seed=0, r=4):
    base = make_tiny("bert")
    config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=["query", "key", "value", "attention.output.dense",
                                                                  "intermediate.dense", r"output.dense"], init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return base, model


def _peft_path_to_name(base):
    view = fta.nn.ModelView(base)
    return {view.ref(n).module_path: n for n in view.matrix_names()}


def test_counts_and_scaling_match_peft_reduce_intruder_dimension(tmp_path):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    base, model = _peft_bert()
    merged = copy.deepcopy(model).merge_and_unload()
    report = fta.probes.spectral_report(base, merged, k=5, cache=False).set_index("name")
    lines = []
    reduce_intruder_dimension(model, top_k=5, threshold_epsilon=0.5, mitigation_lambda=0.25, logging_sink=lines.append)
    path_to_name = _peft_path_to_name(base)
    peft_counts = {}
    for line in lines:
        if ":" in line and not line.startswith("Enabling"):
            path, text = line.split(": ", 1)
            path = path[len("base_model.model."):]
            if path in path_to_name:
                peft_counts[path_to_name[path]] = 0 if text == "No intruders" else int(text.split()[-1])
    assert len(peft_counts) == len(report) and sum(peft_counts.values()) >= 1
    assert {n: int(report.loc[n, "intruders"]) for n in peft_counts} == peft_counts
    # scaling every intruder by lam: PEFT stores W0 + trunc_r(W') - W0 (its adapter keeps rank r), so compare
    # the rank-r truncation of our update with PEFT's new delta
    scaled = fta.probes.scale_intruders(base, merged, 0.25, k=5, which="all", cache=False)
    view0, view_s = fta.nn.ModelView(base), fta.nn.ModelView(scaled)
    layers = {n[len("base_model.model."):]: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    checked = 0
    for path, name in path_to_name.items():
        if peft_counts.get(name, 0) == 0:
            continue
        delta = view_s.get(name) - view0.get(name)
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        truncated = (U[:, :4] * S[:4]) @ Vh[:4]
        expected = layers[path].get_delta_weight("intruder_reduced").detach().double()
        assert torch.allclose(truncated, expected, atol=1e-3 * float(expected.abs().max()))
        checked += 1
    assert checked >= 1


def test_peft_adapter_folder_report_equals_merged_model(tmp_path):
    base, model = _peft_bert(seed=3)
    model.save_pretrained(tmp_path / "adapter")
    merged = copy.deepcopy(model).merge_and_unload()
    via_adapter = fta.probes.spectral_report(base, peft=tmp_path / "adapter", k=4, cache=False)
    direct = fta.probes.spectral_report(base, merged, k=4, cache=False)
    assert via_adapter["intruders"].tolist() == direct["intruders"].tolist()
    assert np.allclose(via_adapter["dW_norm"], direct["dW_norm"], rtol=1e-4)
    with pytest.raises(ValueError, match="carries an adapter"):
        fta.probes.spectral_report(base, model, k=4)


# ---------------------------------------------------------------------- scaling intruders, overlap
def test_scale_intruders_top_all_control_and_identity():
    base = make_tiny("llama")
    ft = perturbed(base, spikes=[("layers.0.attn.q", 1.5), ("layers.1.mlp.up", 1.5)])
    before = {n: w.clone() for n, w in fta.nn.ModelView(ft).matrices()}
    same = fta.probes.scale_intruders(base, ft, 1.0, k=4, cache=False)
    for name, w in fta.nn.ModelView(same).matrices():
        assert torch.allclose(w, before[name], atol=1e-5)
    removed, info = fta.probes.scale_intruders(base, ft, 0.0, k=4, cache=False, return_info=True)
    assert set(info["name"]) >= {"layers.0.attn.q", "layers.1.mlp.up"} and info["intruder"].all()
    report = fta.probes.spectral_report(base, removed, k=4, cache=False).set_index("name")
    assert report.loc["layers.0.attn.q", "intruders"] == 0 and report.loc["layers.1.mlp.up", "intruders"] == 0
    # W' = W1 + (lam - 1) u s v^T for the top intruder only
    W1 = before["layers.0.attn.q"]
    U, S, Vh = torch.linalg.svd(W1)
    half = fta.probes.scale_intruders(base, ft, 0.5, k=4, modules="layers.0.attn.q", cache=False)
    assert torch.allclose(fta.nn.ModelView(half).get("layers.0.attn.q"), W1 - 0.5 * S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-5)
    control, cinfo = fta.probes.scale_intruders(base, ft, 0.0, k=4, control=True, seed=0, cache=False, return_info=True)
    assert len(cinfo) == len(info) and not cinfo["intruder"].any()
    assert fta.probes.spectral_report(base, control, k=4, cache=False)["intruders"].sum() >= 2
    assert all(torch.equal(w, before[n]) for n, w in fta.nn.ModelView(ft).matrices())  # ft untouched


def test_subspace_similarity_and_principal_angles():
    d = 40
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    A = Q[:, :4] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ torch.randn(4, 30)
    B = Q[:, 2:6] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ torch.randn(4, 30)
    assert sp.subspace_similarity(A, A, 4, 4) == pytest.approx(1.0, abs=1e-5)
    C = Q[:, 10:14] @ torch.randn(4, 30)
    assert sp.subspace_similarity(A, C, 4, 4) == pytest.approx(0.0, abs=1e-5)
    # span(A) and span(B) share exactly a 2-D subspace: two angles 0, two angles 90 degrees
    angles = torch.rad2deg(sp.principal_angles(A, B, 4, 4))
    assert torch.allclose(angles, torch.tensor([0.0, 0.0, 90.0, 90.0]), atol=0.5)
    assert sp.subspace_similarity(A, B, 4, 4) == pytest.approx(0.5, abs=1e-4)
    # random subspaces: phi is about max(i, j) / d
    g = torch.Generator().manual_seed(1)
    phis = [sp.subspace_similarity(torch.randn(200, 50, generator=g), torch.randn(200, 50, generator=g), 8, 8) for _ in range(10)]
    assert abs(np.mean(phis) - 8 / 200) < 0.02
    base = make_tiny("gpt2")
    table = fta.probes.subspace_overlap(base, perturbed(base, seed=1), perturbed(base, seed=1), i=4, j=4)
    assert np.allclose(table["phi"], 1.0, atol=1e-4) and (table["phi_random"] < 0.5).all()


# ---------------------------------------------------------------------- bad input
def test_bad_matrix_input():
    W0, _ = decaying(n=16)
    with pytest.raises(ValueError, match="same shape"):
        fta.probes.intruder_dimensions(W0, W0[:, :8])
    with pytest.raises(ValueError, match=r"'k' parameter .* <= min\(out, in\) = 16"):
        fta.probes.intruder_dimensions(W0, W0, k=17)
    for eps in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"'eps' parameter .* \(0.0, 1.0\]"):
            fta.probes.intruder_dimensions(W0, W0, eps=eps)
    assert fta.probes.intruder_dimensions(W0, W0, eps=1.0).count <= 10  # eps = 1 is allowed
    with pytest.raises(TypeError, match="'eps'"):
        fta.probes.intruder_dimensions(W0, W0, eps="0.5")
    with pytest.raises(TypeError, match="'k'"):
        fta.probes.intruder_dimensions(W0, W0, k=2.0)
    with pytest.raises(ValueError, match="'side'"):
        fta.probes.intruder_dimensions(W0, W0, side="up")
    for bad in (float("nan"), float("inf")):
        W1 = W0.clone()
        W1[3, 4] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            fta.probes.intruder_dimensions(W0, W1)
    with pytest.raises(ValueError, match="2-D"):
        fta.probes.intruder_dimensions(W0[0], W0[0])
    with pytest.raises(TypeError, match="'W0'"):
        fta.probes.intruder_dimensions([[1.0]], W0)


def test_bad_model_and_checkpoint_input(tmp_path):
    gpt2, llama = make_tiny("gpt2"), make_tiny("llama")
    with pytest.raises(ValueError, match="different architectures: gpt2 .* vs llama"):
        fta.probes.spectral_report(gpt2, llama)
    with pytest.raises(ValueError, match="different architectures: bert .* vs roberta"):
        fta.probes.spectral_report(make_tiny("bert"), make_tiny("roberta"))
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, n_inner=64, vocab_size=300))
    with pytest.raises(ValueError, match=r"layers.0.attn.q has shape \(32, 32\) in 'base' but \(48, 48\)"):
        fta.probes.spectral_report(gpt2, wider)
    deeper = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, n_inner=64, vocab_size=300))
    with pytest.raises(ValueError, match="2 vs 3 gpt2 layers"):
        fta.probes.spectral_report(gpt2, deeper)
    with pytest.raises(ValueError, match="'k' parameter .* <= min"):
        fta.probes.spectral_report(gpt2, gpt2, k=33)
    with pytest.raises(ValueError, match="'eps'"):
        fta.probes.spectral_report(gpt2, gpt2, eps=0)
    broken = copy.deepcopy(gpt2)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers.1.mlp.up of 'ft' has 1 NaN"):
        fta.probes.spectral_report(gpt2, broken)
    gpt2.save_pretrained(tmp_path / "base")
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    del state["transformer.h.1.attn.c_proj.weight"]
    (tmp_path / "cut").mkdir()
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing weight matrices \['layers.1.attn.o'\]"):
        fta.probes.spectral_report(tmp_path / "base", tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        fta.probes.spectral_report(tmp_path / "base", tmp_path / "nowhere")
    with pytest.raises(TypeError, match="'ft' parameter"):
        fta.probes.spectral_report(gpt2, 3)
    with pytest.raises(ValueError, match="needs the fine-tuned model"):
        fta.probes.spectral_report(gpt2)
    with pytest.raises(ValueError, match="'lam'"):
        fta.probes.scale_intruders(gpt2, gpt2, -0.5)
    with pytest.raises(ValueError, match="'which'"):
        fta.probes.scale_intruders(gpt2, gpt2, 0.5, which="some")


# ---------------------------------------------------------------------- plots and the command line
def test_plots_return_figures():
    base = make_tiny("gpt2")
    reports = {
        "spiked": fta.probes.spectral_report(base, perturbed(base, spikes=[("layers.0.attn.q", 1.5)]), k=5, cache=False),
        "noise": fta.probes.spectral_report(base, perturbed(base), k=5, cache=False),
    }
    W0, s = decaying(n=40)
    result = fta.probes.intruder_dimensions(W0, W0 + 1.5 * s[0] * torch.outer(unit(40, 1), unit(40, 1)))
    table = plots.intruders_vs_eps_table(reports, [0.2, 0.5, 0.9])
    assert table.set_index(["label", "eps"]).loc[("spiked", 0.5), "intruders"] == reports["spiked"]["intruders"].sum()
    assert plots.intruders_vs_k_table(reports)["k"].max() == 5
    lam = {"lam": [0, 0.5, 1, 0, 0.5, 1], "direction": ["intruder"] * 3 + ["control"] * 3,
           "target_accuracy": [0.9] * 6, "retention": [0.8, 0.7, 0.6, 0.5, 0.55, 0.6]}
    figures = [
        result.plot(),
        fta.probes.spectra(W0, W0 * 1.1).plot(),
        plots.plot_intruders_vs_eps(reports),
        plots.plot_intruders_vs_k(reports),
        plots.plot_layer_bars(reports["spiked"]),
        plots.plot_layer_bars(reports["spiked"], "rank_energy"),
        plots.plot_lambda_tradeoff(__import__("pandas").DataFrame(lam)),
    ]
    for fig in figures:
        assert isinstance(fig, plt.Figure)
        plt.close(fig)


def test_cli_writes_table_and_figures(tmp_path, capsys):
    base = make_tiny("gpt2")
    base.save_pretrained(tmp_path / "base")
    perturbed(base, spikes=[("layers.1.attn.v", 1.5)]).save_pretrained(tmp_path / "ft")
    from ftanalysis.cli import main

    main(["spectral", str(tmp_path / "base"), str(tmp_path / "ft"), "--out", str(tmp_path / "out"), "--k", "5"])
    out = tmp_path / "out"
    expected = {"report.csv", "summary_by_kind.csv", "summary_by_layer.csv", "intruders_by_layer.png", "rank_energy_by_layer.png",
                "intruders_vs_eps.png", "intruders_vs_k.png", "cos_heatmap.png", "spectra.png"}
    assert expected <= {p.name for p in out.iterdir()}
    import pandas as pd

    table = pd.read_csv(out / "report.csv")
    assert len(table) == 12 and table.set_index("name").loc["layers.1.attn.v", "intruders"] >= 1
    assert "intruder dimension(s) at k=5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exactly one"):
        main(["spectral", str(tmp_path / "base"), "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="'eps'"):
        main(["spectral", str(tmp_path / "base"), str(tmp_path / "ft"), "--out", str(tmp_path / "o3"), "--eps", "2"])
    # a PEFT adapter folder instead of FT
    pbase, pmodel = _peft_bert(seed=5)
    pbase.save_pretrained(tmp_path / "pbase")
    pmodel.save_pretrained(tmp_path / "adapter")
    main(["spectral", str(tmp_path / "pbase"), "--peft", str(tmp_path / "adapter"), "--out", str(tmp_path / "po"), "--k", "4", "--quiet"])
    assert json.loads(json.dumps(pd.read_csv(tmp_path / "po" / "report.csv")["intruders"].tolist())) == \
        fta.probes.spectral_report(pbase, copy.deepcopy(pmodel).merge_and_unload(), k=4, cache=False)["intruders"].tolist()
