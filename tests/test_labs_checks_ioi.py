"""Lab 07's checks pass on the library's reference, fail on known-wrong mutants with their hint, read a stub as
"not implemented" (tested for every lab in test_labs_checks.py); here: bad arguments, the check models make the
mistakes visible, and the references agree with independent computations written with plain torch hooks."""

from __future__ import annotations

import pytest
import torch

from ftanalysis.labs.checks import ioi as checks
from ftanalysis.probes.circuits import logit_diff


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_head_dla(3)
    with pytest.raises(TypeError, match="lacks \\['layers'\\]"):
        checks.check_head_patching(lambda model, clean_ids, corrupt_ids, metric: None)
    with pytest.raises(TypeError, match="lacks \\['metric'\\]"):
        checks.check_path_patch_to_logits(lambda model, clean_ids, corrupt_ids: None)


def test_the_check_models_cover_both_families_with_norms_that_matter():
    cases = list(checks._cases())
    assert {c["family"] for c in cases} == {"gpt2", "llama"}
    assert any(c["kv_heads"] < c["heads"] for c in cases)  # grouped-query attention
    for case in cases:
        model = checks.model_for(case)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) or hasattr(module, "variance_epsilon"):
                assert not torch.allclose(module.weight, torch.ones_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    assert module.bias.abs().max() > 0.1
    # the copy handed to a student is fresh: a hook left on one copy does not reach the next
    assert checks.model_for(cases[0]) is not checks.model_for(cases[0])


def _family_parts(model):
    if hasattr(model, "transformer"):
        return [b.attn.c_proj for b in model.transformer.h], [b.mlp for b in model.transformer.h]
    return [b.self_attn.o_proj for b in model.model.layers], [b.mlp for b in model.model.layers]


def _record(model, ids):
    """Inputs of every output projection and outputs of every MLP, with plain torch hooks."""
    outs, mlps = _family_parts(model)
    z, mlp, handles = {}, {}, []
    for layer, (out, block_mlp) in enumerate(zip(outs, mlps)):
        handles.append(
            out.register_forward_pre_hook(lambda m, args, layer=layer: z.__setitem__(layer, args[0].clone()))
        )
        handles.append(block_mlp.register_forward_hook(lambda m, a, o, layer=layer: mlp.__setitem__(layer, o.clone())))
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, z, mlp


def _path_by_hand(model, clean, corrupt, metric, layer, head, d_head):
    """Corrupted run with every output projection's input and every MLP output frozen to the corrupted run's, except
    head ``head`` of ``layer``, which gets its clean slice: the direct path to the logits, with real forward passes."""
    _, clean_z, _ = _record(model, clean)
    corrupt_logits, corrupt_z, corrupt_mlp = _record(model, corrupt)
    clean_logits = model(clean).logits
    outs, mlps = _family_parts(model)
    handles = []

    def freeze_z(m, args, layer_=None):
        value = corrupt_z[layer_].clone()
        if layer_ == layer:
            cols = slice(head * d_head, (head + 1) * d_head)
            value[..., cols] = clean_z[layer_][..., cols]
        return (value,)

    for ly, (out, block_mlp) in enumerate(zip(outs, mlps)):
        handles.append(out.register_forward_pre_hook(lambda m, args, ly=ly: freeze_z(m, args, ly)))
        handles.append(block_mlp.register_forward_hook(lambda m, a, o, ly=ly: corrupt_mlp[ly]))
    try:
        patched = model(corrupt).logits
    finally:
        for h in handles:
            h.remove()
    m_clean, m_corrupt = metric(clean_logits).mean(), metric(corrupt_logits).mean()
    return float((metric(patched).mean() - m_corrupt) / (m_clean - m_corrupt))


@pytest.mark.parametrize("index", [0, 1])
def test_reference_path_patching_to_logits_matches_frozen_forward_passes(index):
    case = list(checks._cases())[index]  # one GPT-2, one Llama with grouped-query attention
    model = checks.model_for(case)
    clean, corrupt, answer, wrong = checks.inputs_for(case)
    metric = logit_diff(answer, wrong)
    d_head = case["d_model"] // case["heads"]
    with torch.no_grad():
        expected = checks.reference_path_patch_to_logits(model, clean, corrupt, metric)
        for layer, head in [(0, 1), (case["layers"] - 1, case["heads"] - 1)]:
            by_hand = _path_by_hand(model, clean, corrupt, metric, layer, head, d_head)
            assert by_hand == pytest.approx(float(expected[layer, head]), abs=1e-4)
        assert expected.abs().max() > 0.05  # the check cannot pass on a function that returns zeros


def test_frozen_scale_and_recomputed_norm_differ_on_the_check_models():
    """The hint 'recompute the final norm' only makes sense if freezing the scale changes the numbers."""
    case = list(checks._cases())[1]
    model = checks.model_for(case)
    clean, corrupt, answer, wrong = checks.inputs_for(case)
    metric = logit_diff(answer, wrong)
    with torch.no_grad():
        exact = checks.reference_path_patch_to_logits(model, clean, corrupt, metric)
        gap = metric(model(clean).logits).mean() - metric(model(corrupt).logits).mean()
        frozen = checks._frozen_scale_effect(model, clean, corrupt, answer, wrong) / gap
    assert (exact - frozen).abs().max() > 1e-2
