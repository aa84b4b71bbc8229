"""Lab 03's checks pass on the library's reference, fail on known-wrong mutants with their hint, read a stub as
"not implemented" (tested for every lab in test_labs_checks.py); here: bad arguments, and the references agree with an independent hand-written computation."""

from __future__ import annotations

import einops
import pytest
import torch

from ftanalysis.labs.checks import patching as checks


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_patch_head(3)
    with pytest.raises(TypeError, match="lacks \\['pos'\\]"):
        checks.check_patch_head(lambda model, clean_ids, corrupt_ids, layer, head: None)


# ---------------------------------------------------------------------- independent oracles
def _manual_z(model, ids):
    """Head outputs recomputed by hand from GPT-2's weights (no hooks): softmax(q k^T / sqrt(d)) v per head."""
    cfg = model.config
    h = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))
    out = {}
    for layer, block in enumerate(model.transformer.h):
        x = block.ln_1(h)
        q, k, v = block.attn.c_attn(x).split(cfg.n_embd, dim=-1)
        q, k, v = (einops.rearrange(t, "b p (h d) -> b h p d", h=cfg.n_head) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        z = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [b, h, p, d]
        out[layer] = einops.rearrange(z, "b h p d -> b p h d")
        h = h + block.attn.c_proj(einops.rearrange(z, "b h p d -> b p (h d)"))
        h = h + block.mlp(block.ln_2(h))
    return out


def test_reference_head_outputs_match_a_hand_computation():
    model = checks.tiny_gpt2(2, 4, 32, seed=3)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _manual_z(model, ids)
        got = checks.reference_head_outputs(model, ids)
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=1e-4)


def test_reference_patch_head_matches_the_library_sweep_and_is_local():
    model = checks.tiny_gpt2(2, 4, 32, seed=1)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 40, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 1) % 40
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    metric = checks.logit_diff(answer, wrong)
    with torch.no_grad():
        effect = checks.reference_patching_sweep(model, clean, corrupt, metric)
        clean_m, corrupt_m = metric(model(clean).logits).mean(), metric(model(corrupt).logits).mean()
        for layer, pos, head in [(0, 2, 1), (1, 5, 3), (1, 4, 0)]:
            patched = metric(checks.reference_patch_head(model, clean, corrupt, layer, pos=pos, head=head)).mean()
            assert float((patched - corrupt_m) / (clean_m - corrupt_m)) == pytest.approx(float(effect[layer, pos, head]), abs=1e-4)
        # causality: patching before the corrupted position changes nothing
        assert effect[:, :2].abs().max() < 1e-5
        # the random models are big enough that patching matters (the checks cannot pass on a no-op)
        assert effect.abs().max() > 0.05


def test_reference_cross_model_patch_all_heads_of_all_layers_gives_ft_logits_when_only_attention_differs():
    base = checks.tiny_gpt2(2, 4, 32, seed=2)
    ft = checks.perturbed_copy(base, seed=2)
    # keep everything but the attention input projections of ft equal to base: then patching every head's z
    # (with base's own W_O) reproduces ft exactly
    with torch.no_grad():
        for (name, p_base), (_, p_ft) in zip(base.named_parameters(), ft.named_parameters()):
            if "c_attn" not in name:
                p_ft.copy_(p_base)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    heads = [(layer, h) for layer in range(2) for h in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(checks.reference_cross_model_patch(base, ft, ids, heads), ft(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(ids).logits, ft(ids).logits, atol=1e-2)
