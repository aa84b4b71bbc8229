"""Tasks: determinism, disjoint splits, exact answers, batching, scoring and bad input."""

from __future__ import annotations

import re

import pytest
import torch

import ftanalysis as fta
from ftanalysis.tasks import split_of
from ftanalysis.tasks.vocab import VOCAB

REQUIRED = {"entity_tracking", "modular_arithmetic", "counting", "copy", "reverse", "facts", "associative_recall", "pretraining_mix"}


def test_available_lists_required_tasks():
    assert REQUIRED <= set(fta.tasks.available())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_same_seed_same_examples_and_different_seed_differs(name):
    a = fta.tasks.make(name, seed=0).examples(50, "train")
    b = fta.tasks.make(name, seed=0).examples(50, "train")
    c = fta.tasks.make(name, seed=1).examples(50, "train")
    assert a == b
    if name != "facts":  # a 48-fact table repeats often, but the order still differs
        assert a != c


@pytest.mark.parametrize("name", sorted(REQUIRED - {"facts", "pretraining_mix"}))
def test_splits_never_share_a_prompt(name):
    task = fta.tasks.make(name)
    prompts = {split: {e.prompt for e in task.examples(300, split)} for split in ("train", "val", "test")}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    for split, ps in prompts.items():
        assert all(split_of(p) == split for p in ps)


def test_entity_tracking_answers_are_exact():
    task = fta.tasks.make("entity_tracking", n_boxes=5)
    for ex in task.examples(200, "test"):
        pairs = dict((box, obj) for obj, box in re.findall(r"the (\w+) is in box (\w)", ex.prompt))
        assert len(pairs) == 5
        query = re.search(r"\. box (\w) contains the$", ex.prompt).group(1)
        assert pairs[query] == ex.answer
    assert task.chance == pytest.approx(1 / 5)


def test_entity_tracking_box_range_and_chance():
    task = fta.tasks.make("entity_tracking", n_boxes=(2, 4))
    counts = {ex.prompt.count(" is in box ") for ex in task.examples(300, "train")}
    assert counts == {2, 3, 4}
    assert task.chance == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_modular_arithmetic_answers(op):
    task = fta.tasks.make("modular_arithmetic", op=op, modulus=17)
    for ex in task.examples(100, "test"):
        a, sym, b, _, m, _ = ex.prompt.split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[sym] % int(m)
        assert int(ex.answer) == expected and sym == op and int(m) == 17


def test_counting_counts_the_chosen_token_with_the_same_prompt():
    a = fta.tasks.make("counting", token="a")
    b = fta.tasks.make("counting", token="b")
    for ex in a.examples(100, "test"):
        seq = ex.prompt.split()[2:-1]
        assert int(ex.answer) == seq.count("a")
    for ex in b.examples(100, "test"):
        seq = ex.prompt.split()[2:-1]
        assert int(ex.answer) == seq.count("b")
        assert ex.prompt.startswith("count : ")  # the prompt does not name the token (Jain et al.)


def test_copy_and_reverse():
    for ex in fta.tasks.make("copy").examples(50):
        assert ex.prompt.split()[2:-1] == ex.answer.split()
    for ex in fta.tasks.make("reverse").examples(50):
        assert ex.prompt.split()[2:-1][::-1] == ex.answer.split()


def test_fact_table_is_fixed_and_shared_by_splits():
    task = fta.tasks.make("facts", seed=3)
    other = fta.tasks.make("facts", seed=7)
    assert task.table == other.table  # the table depends on table_seed only
    assert fta.tasks.make("facts", table_seed=1).table != task.table
    for ex in task.examples(50, "test"):
        name, *rel = ex.prompt.split()
        assert task.table[(name, " ".join(rel))] == ex.answer


def test_every_task_word_is_in_the_vocabulary_and_tokenizer(tok):
    assert len(set(VOCAB)) == len(VOCAB)
    for name in fta.tasks.available():
        task = fta.tasks.make(name)
        if task.kind != "lm" or isinstance(task, fta.tasks.NaturalTask):  # English tasks: a BPE tokenizer's
            continue
        assert task.words() <= set(VOCAB)
        task.check_tokenizer(tok)


def test_tokenizer_round_trip_and_bos(tok, tmp_path):
    text = "the apple is in box F , the key is in box C . box F contains the"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids


def test_collate_labels_only_answer_tokens(tok):
    ex = fta.tasks.Example(prompt="copy : a b c =", answer="a b c")
    batch = fta.tasks.collate([ex, fta.tasks.Example("alice likes", "red")], tok)
    labels = batch["labels"]
    assert batch["input_ids"].shape == labels.shape
    assert (labels[0] != -100).sum() == 3 and (labels[1] != -100).sum() == 1
    n_prompt = len(tok("copy : a b c =")["input_ids"])
    assert labels[0, n_prompt:n_prompt + 3].tolist() == tok("a b c", add_special_tokens=False)["input_ids"]
    assert batch["attention_mask"][1].sum() == len(tok("alice likes red")["input_ids"])


def test_batches_are_a_function_of_step_and_seed(tok):
    task = fta.tasks.make("counting")
    assert torch.equal(task.batch(tok, 8, step=5)["input_ids"], task.batch(tok, 8, step=5)["input_ids"])
    assert not torch.equal(task.batch(tok, 8, step=5)["input_ids"], task.batch(tok, 8, step=6)["input_ids"])
    assert not torch.equal(task.batch(tok, 8, step=5, seed=1)["input_ids"], task.batch(tok, 8, step=5)["input_ids"])


class _Oracle(torch.nn.Module):
    """Peeks at the next token: a perfect predictor, to check the scorer (accuracy 1, loss ~0)."""

    def __init__(self, vocab, cheat=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)
        self.vocab, self.cheat = vocab, cheat

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.cheat:
            nxt = torch.roll(input_ids, -1, dims=1)
            logits.scatter_(2, nxt[..., None], 50.0)
        return type("Out", (), {"logits": logits})()


def test_scoring_against_a_perfect_and_a_uniform_predictor(tok):
    task = fta.tasks.make("copy")
    perfect = task.evaluate(_Oracle(len(tok)), tok, n=64)
    assert perfect["accuracy"] == 1.0 and perfect["token_accuracy"] == 1.0 and perfect["loss"] < 1e-6
    uniform = task.evaluate(_Oracle(len(tok), cheat=False), tok, n=64)
    assert uniform["loss"] == pytest.approx(torch.log(torch.tensor(float(len(tok)))).item(), rel=1e-5)
    mix = fta.tasks.make("pretraining_mix").evaluate(_Oracle(len(tok)), tok, n=16)
    assert mix["accuracy"] == 1.0 and mix["entity_tracking/accuracy"] == 1.0


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="Available tasks: .*entity_tracking"):
        fta.tasks.make("entity_trackin")


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="Accepted options: \\['n_boxes'\\]"):
        fta.tasks.make("entity_tracking", n_box=3)


@pytest.mark.parametrize(
    "name, options",
    [
        ("entity_tracking", {"n_boxes": 1}),
        ("entity_tracking", {"n_boxes": (5, 3)}),
        ("modular_arithmetic", {"op": "/"}),
        ("modular_arithmetic", {"modulus": 101}),
        ("counting", {"token": "z"}),
        ("copy", {"length": 0}),
        ("facts", {"relations": ("hates",)}),
    ],
)
def test_bad_options_are_clear_errors(name, options):
    with pytest.raises((ValueError, TypeError), match=list(options)[0]):
        fta.tasks.make(name, **options)


def test_bad_split_and_n():
    task = fta.tasks.make("copy")
    with pytest.raises(ValueError, match="'split'"):
        task.examples(3, split="dev")
    with pytest.raises(ValueError, match="'n'"):
        task.examples(0)


def test_tokenizer_without_the_task_words_is_rejected(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "copy": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    small = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="lacks"):
        fta.tasks.make("copy").check_tokenizer(small)
