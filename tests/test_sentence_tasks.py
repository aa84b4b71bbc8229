"""Real-word sentence tasks (VADER lexicon) and the encoder classifier."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta

pytest.importorskip("vaderSentiment")
from ftanalysis.tasks.sentences import SUBJECTS, sentiment_words, vader_lexicon  # noqa: E402


def _word(sentence):
    return sentence.split()[-2]


def test_splits_never_share_a_word():
    task = fta.tasks.make("sentiment_negation")
    words = {s: {_word(e.prompt) for e in task.examples(400, s)} for s in ("train", "val", "test")}
    assert not words["train"] & words["test"] and not words["train"] & words["val"] and not words["val"] & words["test"]
    groups = sentiment_words()
    assert {w for w, _ in groups["test"]} >= words["test"]
    assert len(groups["train"]) > 3000 and len(groups["test"]) > 300


def test_sentiment_labels_follow_valence_and_negation():
    lexicon = vader_lexicon()
    task = fta.tasks.make("sentiment_negation")
    seen_negated = seen_plain = 0
    for ex in task.examples(300, "test"):
        negated = " not " in f" {ex.prompt} "
        positive = (lexicon[_word(ex.prompt)] > 0) != negated
        assert ex.answer == ("positive" if positive else "negative")
        seen_negated += negated
        seen_plain += not negated
    assert seen_negated > 100 and seen_plain > 100


def test_subject_category_labels():
    task = fta.tasks.make("subject_category")
    lookup = {s: c for c, subjects in SUBJECTS.items() for s in subjects}
    for ex in task.examples(100):
        subject = next(w for w in ex.prompt.split() if w in lookup)
        assert lookup[subject] == ex.answer
    assert task.n_classes == 4 and task.chance == 0.25


def test_word_level_tokenizer_cannot_write_real_sentences(tok):
    with pytest.raises(ValueError, match="subword tokenizer"):
        fta.tasks.make("sentiment_negation").check_tokenizer(tok)


def test_bad_options():
    with pytest.raises(ValueError, match="'negation_rate'"):
        fta.tasks.make("sentiment_negation", negation_rate=1.5)


def test_encoder_classifier_trains_head_under_every_method():
    from transformers import BertTokenizerFast

    body = make_tiny("bert", vocab_size=100)
    clf = fta.zoo.EncoderClassifier(body, n_classes=3, seed=1)
    ids = torch.randint(0, 100, (4, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    logits = clf(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (4, 3)
    # mean pooling ignores padded positions
    ids2 = ids.clone()
    ids2[0, 5:] = 7
    assert torch.allclose(clf(input_ids=ids2, attention_mask=mask).logits[0], logits[0], atol=1e-5)
    for method in (fta.methods.LoRA(r=2), fta.methods.LinearProbe()):
        adapted = method.apply(clf, copy=True)
        trainable = {n for n, _ in method.trainable_parameters(adapted)}
        assert {"head.weight", "head.bias"} <= trainable
    assert BertTokenizerFast  # the classifier works with any BERT tokenizer
