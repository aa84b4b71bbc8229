"""Activation and attribution patching: identities, batched == one forward per component == a hand-written
patch, the normalisation, attribution == exact on a linear toy, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes.circuits import (
    activation_patching,
    answer_logprob,
    attribution_patching,
    compare_with_exact,
    logit_diff,
    run_with_cache,
    run_with_hooks,
)
from ftanalysis.probes.circuits._common import rank


def pair(seed=0, batch=3, seq=6, changed=(2,)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 250, (batch, seq), generator=g)
    corrupt = clean.clone()
    for p in changed:
        corrupt[:, p] = torch.randint(3, 250, (batch,), generator=g)
    return clean, corrupt


def metric_for(batch=3):
    return logit_diff(torch.arange(5, 5 + batch), torch.arange(50, 50 + batch))


def test_public_api_name():
    assert fta.probes.activation_patching is activation_patching


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("component", ["z", "resid_pre", "v"])
def test_patching_clean_into_clean_changes_nothing(family, component):
    model = make_tiny(family)
    clean, _ = pair()
    result = activation_patching(model, clean, clean, metric_for(), component=component, normalize=False)
    assert result.effect.abs().max() < 1e-5
    assert result.clean_metric == pytest.approx(result.corrupt_metric)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patching_the_whole_first_residual_stream_reproduces_the_clean_logits(family):
    model = make_tiny(family)
    clean, corrupt = pair(changed=(1, 3, 5))
    clean_logits, cache = run_with_cache(model, clean, names_filter="layers.0.hook_resid_pre")
    patched = run_with_hooks(model, corrupt, fwd_hooks=[("layers.0.hook_resid_pre", lambda v, h: cache[h.name])])
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)
    # and through activation_patching: the one position that differs carries the whole effect
    result = activation_patching(model, clean, pair(changed=(3,))[1], metric_for(), component="resid_pre", layers=[0])
    expected = torch.zeros(6)
    expected[3] = 1.0
    torch.testing.assert_close(result.effect[0], expected, atol=1e-4, rtol=0)


def hand_patch(model, clean, corrupt, metric, layer, pos, head):
    """One component patched by a plain torch pre-hook on the output projection (no ftanalysis hook code)."""
    view = fta.nn.ModelView(model)
    module = view.wrapper(f"layers.{layer}.attn.o")
    store = {}
    cols = slice(head * view.d_head, (head + 1) * view.d_head)
    handle = module.register_forward_pre_hook(lambda m, args: store.__setitem__("z", args[0].detach().clone()))
    try:
        with torch.no_grad():
            clean_value = metric(model(input_ids=clean).logits).mean()
    finally:
        handle.remove()

    def patch(m, args):
        z = args[0].clone()
        z[:, pos, cols] = store["z"][:, pos, cols]
        return (z,)

    handle = module.register_forward_pre_hook(patch)
    try:
        with torch.no_grad():
            patched = metric(model(input_ids=corrupt).logits).mean()
    finally:
        handle.remove()
    with torch.no_grad():
        corrupt_value = metric(model(input_ids=corrupt).logits).mean()
    return float((patched - corrupt_value) / (clean_value - corrupt_value))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_equals_one_forward_per_component_and_a_hand_written_patch(family):
    model = make_tiny(family)
    clean, corrupt = pair(changed=(1, 2))
    metric = metric_for()
    batched = activation_patching(model, clean, corrupt, metric, batch_size=9)  # 3 components per pass
    loop = activation_patching(model, clean, corrupt, metric, method="loop", positions=[1, 2, 5])
    assert batched.effect.shape == (2, 6, 4) and batched.dims == ("layer", "pos", "head")
    # the raw metric: this pair's clean - corrupt gap is 1e-4, so the normalised effect magnifies float32 rounding
    # (different batch shapes sum in different orders) by 1e4
    torch.testing.assert_close(batched.patched[:, [1, 2, 5]], loop.patched, atol=1e-6, rtol=0)
    for layer, pos, head in [(0, 2, 1), (1, 5, 3), (1, 2, 0)]:
        assert batched.effect[layer, pos, head].item() == pytest.approx(hand_patch(model, clean, corrupt, metric, layer, pos, head), rel=2e-4)
    # the normalisation written out
    torch.testing.assert_close(batched.effect, (batched.patched - batched.corrupt_metric) / (batched.clean_metric - batched.corrupt_metric))
    frame = batched.to_frame()
    assert len(frame) == 48 and set(frame.columns) >= {"layer", "pos", "head", "effect"}


@pytest.mark.parametrize("component", ["q", "k", "pattern", "result", "attn_out", "mlp_out", "resid_mid", "resid_post"])
def test_batched_equals_loop_for_every_component(component):
    model = make_tiny("llama")
    clean, corrupt = pair(changed=(2,))
    metric = answer_logprob(torch.arange(5, 8))
    kwargs = dict(layers=[1], positions=[2, 5])
    batched = activation_patching(model, clean, corrupt, metric, component=component, batch_size=7, **kwargs)
    loop = activation_patching(model, clean, corrupt, metric, component=component, method="loop", **kwargs)
    torch.testing.assert_close(batched.effect, loop.effect, atol=1e-6, rtol=0)
    heads = {"k": 2, "q": 4, "pattern": 4, "result": 4}.get(component)  # key heads: n_kv_heads
    assert batched.effect.shape == ((1, 2, heads) if heads else (1, 2))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("per_position", [True, False])
def test_patching_a_heads_result_equals_patching_its_z(family, per_position):
    # result_h = z_h W_O[h]: the output projection is linear and its bias is shared, so the two patches are one
    model = make_tiny(family)
    clean, corrupt = pair(changed=(1, 3))
    z = activation_patching(model, clean, corrupt, metric_for(), component="z", per_position=per_position)
    result = activation_patching(model, clean, corrupt, metric_for(), component="result", per_position=per_position)
    assert result.effect.abs().max() > 0.01 and result.dims == z.dims
    torch.testing.assert_close(result.effect, z.effect, atol=1e-4, rtol=0)  # float32: sum of head results vs one matmul


def test_all_positions_at_once_and_aligned_positions():
    model = make_tiny("gpt2")
    clean, corrupt = pair(changed=(2,))
    metric = metric_for()
    whole = activation_patching(model, clean, corrupt, metric, per_position=False)
    assert whole.dims == ("layer", "head") and whole.effect.shape == (2, 4)
    # a longer corrupt prompt (one token inserted at the front), aligned explicitly
    longer = torch.cat([torch.full((3, 1), 7), corrupt], dim=1)
    aligned = activation_patching(model, clean, longer, metric, positions=[(5, 6), (2, 3)], component="resid_post", normalize=False)
    assert aligned.effect.shape == (2, 2) and aligned.positions == [6, 3]
    # the last resid_post decides the logits: patching it at the final position restores the clean metric
    assert aligned.patched[1, 0].item() == pytest.approx(aligned.clean_metric, abs=1e-4)


def linear_toy():
    """GPT-2 whose metric is linear in the last layer's activations: no final norm, last MLP writes zero."""
    model = make_tiny("gpt2")
    model.transformer.ln_f = torch.nn.Identity()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.zero_()
        model.transformer.h[1].mlp.c_proj.bias.zero_()
    return model


@pytest.mark.parametrize("component", ["z", "v", "attn_out", "resid_post"])
def test_attribution_patching_is_exact_for_a_linear_metric_on_a_linear_toy(component):
    model = linear_toy()
    clean, corrupt = pair(changed=(0, 2, 4))
    metric = metric_for()
    exact = activation_patching(model, clean, corrupt, metric, component=component, layers=[1])
    estimate = attribution_patching(model, clean, corrupt, metric, component=component, layers=[1])
    torch.testing.assert_close(estimate.effect, exact.effect, atol=1e-5, rtol=0)
    comparison = compare_with_exact(estimate, exact, top_k=5)
    assert comparison.top_overlap == 1.0
    # ranks agree wherever there is an effect to rank (components that cannot matter are exactly 0 in the
    # exact sweep and float noise of 1e-6 in the estimate, which makes their ranks arbitrary)
    moved = exact.effect.abs() > 1e-4
    assert moved.any()
    assert torch.equal(rank(estimate.effect[moved]), rank(exact.effect[moved]))


def test_attribution_patching_leaves_parameter_gradients_alone_and_is_not_exact_in_general():
    model = make_tiny("gpt2")
    clean, corrupt = pair(changed=(2,))
    metric = answer_logprob(torch.arange(5, 8))
    estimate = attribution_patching(model, clean, corrupt, metric)
    assert all(p.grad is None for p in model.parameters())
    exact = activation_patching(model, clean, corrupt, metric)
    assert estimate.effect.shape == exact.effect.shape
    assert not torch.allclose(estimate.effect, exact.effect, atol=1e-6)  # non-linear path: an estimate
    assert compare_with_exact(estimate, exact).spearman > 0.5


def test_bad_input_gives_clear_errors():
    model = make_tiny("gpt2")
    clean, corrupt = pair()
    metric = metric_for()
    with pytest.raises(ValueError, match="align them explicitly"):
        activation_patching(model, clean, corrupt[:, :5], metric)
    with pytest.raises(ValueError, match="same batch size"):
        activation_patching(model, clean, corrupt[:2], metric)
    with pytest.raises(ValueError, match="'component' parameter .* must be one of"):
        activation_patching(model, clean, corrupt, metric, component="hook_nope")
    with pytest.raises(ValueError, match="layer 2 is out of range for a model with 2 layers"):
        activation_patching(model, clean, corrupt, metric, layers=[2])
    with pytest.raises(ValueError, match="head 4 is out of range for 4 heads"):
        activation_patching(model, clean, corrupt, metric, heads=[4])
    with pytest.raises(ValueError, match="position 9 is out of range"):
        activation_patching(model, clean, corrupt, metric, positions=[9])
    with pytest.raises(ValueError, match=r"one scalar per example: a tensor of shape \(3,\)"):
        activation_patching(model, clean, corrupt, lambda logits: logits[:, -1, :2])
    with pytest.raises(ValueError, match=r"shape \(3,\). Got shape \(\)"):
        activation_patching(model, clean, corrupt, lambda logits: logits[:, -1, 0].mean())
    with pytest.raises(TypeError, match="must return a torch tensor"):
        activation_patching(model, clean, corrupt, lambda logits: 1.0)
    with pytest.raises(ValueError, match="normalize=False"):
        activation_patching(model, clean, clean, metric)
    with pytest.raises(TypeError, match="integer token ids"):
        activation_patching(model, clean.float(), corrupt, metric)
    with pytest.raises(ValueError, match="'heads' applies to per-head components"):
        activation_patching(model, clean, corrupt, metric, component="resid_pre", heads=[0])
    with pytest.raises(ValueError, match="align them explicitly"):
        attribution_patching(model, clean, corrupt[:, :5], metric)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_path_skips_unchanged_components_and_runs_only_later_positions(family, monkeypatch):
    """Causality, used twice: components before the first changed token are not run (their effect is exactly
    0), and a chunk starting at position p runs positions >= p only, on the corrupted run's cache."""
    import ftanalysis.probes.circuits.patching as patching
    from ftanalysis.nn.kv_cache import cache_kwarg

    model = make_tiny(family)
    clean, corrupt = pair(changed=(3,))
    metric = metric_for()
    lengths = []
    real = patching.run_with_hooks

    def spy(model_, ids, **kwargs):
        lengths.append((ids.shape[1], cache_kwarg(model_) in kwargs))
        return real(model_, ids, **kwargs)

    monkeypatch.setattr(patching, "run_with_hooks", spy)
    batched = activation_patching(model, clean, corrupt, metric, batch_size=3 * clean.shape[0])  # one position per pass
    monkeypatch.setattr(patching, "run_with_hooks", real)
    loop = activation_patching(model, clean, corrupt, metric, method="loop")
    torch.testing.assert_close(batched.patched, loop.patched, atol=1e-6, rtol=0)
    assert (batched.effect[:, :3] == 0).all()
    seq = clean.shape[1]
    # 2 layers x 4 heads at positions 3..5, three components per pass, latest positions first
    assert sorted({length for length, _ in lengths}) == sorted(seq - p for p in range(3, seq))
    assert all(with_past for length, with_past in lengths if length < seq)


def test_patching_from_a_late_position_raises_no_cache_deprecation_warning():
    """The cached prefix goes in under the name the installed transformers takes (``cache`` in 5.x)."""
    import warnings

    import ftanalysis as fta
    from ftanalysis.probes import activation_patching

    base, _ = fta.zoo.load("gpt2-tiny")
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(5, 50, (4, 8), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 5] = 7  # the runs differ only from position 5: the patched runs reuse a cached prefix

    def metric(logits):
        return logits[:, -1, 10] - logits[:, -1, 11]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        activation_patching(base, clean, corrupt, metric, "z")
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attribution_patching_of_a_heads_result_equals_that_of_its_z(family):
    # (r_clean - r_corrupt) . dm/dr = (z_clean - z_corrupt) W_O . dm/d(attn_out) = (z_clean - z_corrupt) . dm/dz
    model = make_tiny(family)
    clean, corrupt = pair(changed=(1, 3))
    z = attribution_patching(model, clean, corrupt, metric_for(), component="z")
    result = attribution_patching(model, clean, corrupt, metric_for(), component="result")
    assert result.effect.abs().max() > 0.01 and result.effect.shape == z.effect.shape
    torch.testing.assert_close(result.effect, z.effect, atol=1e-4, rtol=0)
