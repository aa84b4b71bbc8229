"""TuCo: the decomposition is exact, zero when nothing was fine-tuned, and steering hits both endpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes import steer, tuco
from ftanalysis.probes.contribution import decomposition_hooks
from ftanalysis.probes.similarity import encode


def _perturbed(model, scale=0.05, seed=1, blocks_only=False):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    prefix = fta.nn.ModelView(out).block_list_path
    with torch.no_grad():
        for name, p in out.named_parameters():
            if not blocks_only or name.startswith(prefix):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _logits(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def prompts():
    return [e.prompt for e in fta.tasks.make("counting").examples(8)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tuco_is_zero_when_ft_equals_base(family, tok, prompts):
    base = make_tiny(family)
    result = tuco(base, copy.deepcopy(base), tok, prompts)
    assert torch.all(result.tuco == 0) and torch.all(result.ftc_norm == 0)
    assert torch.all(result.ptc_norm > 0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decomposition_is_exact(family, tok, prompts):
    base = make_tiny(family)
    ft = _perturbed(base)
    batch = encode(tok, prompts)
    record = []
    hooks_before = [dict(b._forward_hooks) for b in fta.nn.ModelView(ft).blocks]
    with decomposition_hooks(base, ft, record=record):
        out = ft(**batch, output_hidden_states=True)  # transformers installs its own (permanent) capture hooks
    hidden = out.hidden_states
    assert len(record) == 2
    # x_1 - x_0 = PTC_0 + FTC_0 on the fine-tuned trajectory (HF's last hidden state is normed: skip it)
    ptc, ftc = record[0]
    assert torch.allclose(hidden[1] - hidden[0], ptc + ftc, atol=1e-5)
    # PTC_0 is the base block's update on the fine-tuned model's input state
    block_kwargs = {"attention_mask": None} if family == "gpt2" else {}
    assert ptc.abs().sum() > 0 and ftc.abs().sum() > 0
    ours_removed = [{k: v for k, v in b._forward_hooks.items() if "output_capturing" not in getattr(v, "__qualname__", "")} for b in fta.nn.ModelView(ft).blocks]
    assert all(not h for h in ours_removed) and all(set(before) <= set(b._forward_hooks) for before, b in zip(hooks_before, fta.nn.ModelView(ft).blocks))
    del block_kwargs


def test_tuco_bounds_and_ordering(tok, prompts):
    base = make_tiny("gpt2")
    small, large = _perturbed(base, 0.01), _perturbed(base, 0.2)
    r_small, r_large = tuco(base, small, tok, prompts), tuco(base, large, tok, prompts)
    assert torch.all((r_small.tuco > 0) & (r_small.tuco < 1))
    assert r_large.mean > r_small.mean
    frame = r_small.to_frame()
    assert list(frame.columns) == ["prompt", "tuco", "ptc_norm", "ftc_norm"] and len(frame) == len(prompts)
    assert r_small.layer_frame().shape == (2, 3)
    # TuCo by hand from the recorded components at the last token
    batch = encode(tok, prompts[:1])
    record = []
    with decomposition_hooks(base, small, record=record):
        small(**batch)
    last = int(batch["attention_mask"].sum()) - 1
    p = sum(r[0][0, last] for r in record)
    f = sum(r[1][0, last] for r in record)
    assert r_small.tuco[0].item() == pytest.approx(float(f.norm() / (p.norm() + f.norm())), rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_steering_endpoints(family, tok, prompts):
    base = make_tiny(family)
    ft = _perturbed(base)  # embeddings, norms and head move too
    batch = encode(tok, prompts)
    base_logits, ft_logits = _logits(base, batch), _logits(ft, batch)
    with steer(base, ft, alpha=1.0) as model:
        assert torch.allclose(_logits(model, batch), ft_logits, atol=1e-5)
    with steer(base, ft, alpha=0.0) as model:
        assert torch.allclose(_logits(model, batch), base_logits, atol=1e-5)
    with steer(base, ft, alpha=0.5) as model:
        mid = _logits(model, batch)
        hooked = fta.nn.ModelView(model).blocks
    assert not any(b._forward_hooks for b in hooked)  # removed on exit
    d_base, d_ft = (mid - base_logits).norm(), (mid - ft_logits).norm()
    assert d_base > 1e-3 and d_ft > 1e-3
    # the paper's setting: only the blocks are decomposed; alpha = 0 then keeps the fine-tuned ends
    with steer(base, ft, alpha=0.0, ends="finetuned") as model:
        assert not torch.allclose(_logits(model, batch), base_logits, atol=1e-4)
    ft_blocks = _perturbed(base, blocks_only=True)
    with steer(base, ft_blocks, alpha=0.0, ends="finetuned") as model:
        assert torch.allclose(_logits(model, batch), base_logits, atol=1e-5)


def test_hooks_removed_after_an_error(tok, prompts):
    base = make_tiny("gpt2")
    ft = _perturbed(base)
    with pytest.raises(RuntimeError):
        with steer(base, ft, alpha=0.3) as model:
            blocks = fta.nn.ModelView(model).blocks
            raise RuntimeError("boom")
    assert not any(b._forward_hooks for b in blocks)
    with pytest.raises(ValueError, match="one architecture"):
        tuco(base, make_tiny("llama"), tok, prompts)
