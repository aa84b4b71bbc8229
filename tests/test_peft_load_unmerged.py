"""``fta.load_peft``: a base given by name or folder, and ``merge=False`` for an adapter that keeps training."""

from __future__ import annotations

import copy

import pytest
import torch

import ftanalysis as fta

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT LoRA adapter of the zoo GPT-2 with random A and B (c_attn and c_fc), and PEFT's own model of it."""
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    base, tok = fta.zoo.load("gpt2-tiny")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(folder)
    return base, tok, theirs, folder


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(1))


def test_base_by_zoo_name_merged(adapter):
    base, _, theirs, folder = adapter
    merged = fta.load_peft("gpt2-tiny", folder)
    torch.testing.assert_close(_logits(merged, IDS), _logits(theirs, IDS), atol=1e-4, rtol=0)


def test_unmerged_adapter_computes_the_same_and_keeps_training(adapter):
    base, tok, theirs, folder = adapter
    model = fta.load_peft(base, folder, merge=False)
    (method,) = fta.methods.applied_methods(model)
    assert isinstance(method, fta.methods.LoRA) and (method.r, method.alpha) == (4, 8.0)
    assert sorted({n.split(".", 2)[2] for n in method.targets_}) == ["attn.k", "attn.q", "attn.v", "mlp.up"]
    torch.testing.assert_close(_logits(model.eval(), IDS), _logits(theirs, IDS), atol=1e-4, rtol=0)
    # continue training the same adapter: same configuration, no second adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    result = fta.finetune(model, tok, fta.tasks.make("reverse"), fta.methods.LoRA(r=4, alpha=8, target=method.target),
                          steps=3, lr=1e-3, batch_size=8, seed=0, progress=False)
    trained = result.model
    assert len(fta.methods.applied_methods(trained)) == 1
    after = {n: p.detach() for n, p in trained.named_parameters() if "lora_" in n}
    assert after.keys() == before.keys() and any(not torch.equal(before[n], after[n]) for n in before)
    assert result.trainable_parameters == sum(p.numel() for p in before.values())
    assert "lora_A" not in str(list(result.merged_model().state_dict()))


def test_unmerged_refuses_dora(tmp_path):
    base, _ = fta.zoo.load("gpt2-tiny")
    config = peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, use_dora=True, init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match=r"merge=False\) keeps plain LoRA.*DoRA.*merge=True"):
        fta.load_peft(base, tmp_path / "dora", merge=False)
    fta.load_peft(base, tmp_path / "dora")  # merged, it loads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ia3_exports_to_peft_exactly(family, tmp_path):
    """(IA)^3 vectors (random, so every one matters) exported to PEFT's format: PEFT's model computes ours."""
    from conftest import make_tiny

    base = make_tiny(family)
    method = fta.methods.IA3()  # k, v and the MLP's down projection (feedforward), as in the paper
    ours = method.apply(copy.deepcopy(base))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=generator))
    path = fta.export_peft(ours, tmp_path / "ia3")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    ids = torch.randint(5, 200, (2, 7), generator=generator)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours.eval(), ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(theirs.merge_and_unload(), ids), _logits(method.merge(ours), ids), atol=1e-5, rtol=0)
