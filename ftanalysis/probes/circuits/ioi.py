"""Indirect-object-identification (IOI) inputs for the circuit probes: clean and corrupted token ids, aligned.

Wang, Variengien, Conmy, Shlegeris and Steinhardt 2022, "Interpretability in the Wild: a Circuit for Indirect
Object Identification in GPT-2 small" (arXiv 2211.00593). The prompts are the package's IOI task
(:class:`ftanalysis.tasks.ioi.IOI`)::

    When Mary and John went to the store, John gave a drink to  ->  " Mary"  (IO; the subject S is John)

Patching assumes that position ``p`` of a clean prompt and of its corrupted counterpart hold the same role, and
that every prompt of a batch has the same length (no padding). So a batch uses **one template** (its prompts
differ only in names, place and object, each one token with a BPE tokenizer such as SmolLM2's), and each
corruption below keeps the token count:

- ``"abc"``: S2 replaced by a third name C (Wang et al.'s ABC distribution; the answer stays IO);
- ``"swap_names"``: IO and S exchanged everywhere (the answer becomes the old S);
- ``"s2_swap"``: only S2 replaced by IO (the answer becomes the old S).

The metric of Wang et al. is ``logit(IO) - logit(S)`` of the *clean* prompt at the last position:
``logit_diff(batch.io_ids, batch.s_ids)``, read on clean, corrupted and patched runs alike.

Examples
--------
>>> import ftanalysis as fta
>>> from ftanalysis.probes.circuits import ioi_batch, logit_diff
>>> model, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
>>> batch = ioi_batch(tok, 8, corruption="abc")  # doctest: +SKIP
>>> batch.clean_ids.shape, batch.corrupt_ids.shape  # doctest: +SKIP
(torch.Size([8, 14]), torch.Size([8, 14]))
>>> metric = logit_diff(batch.io_ids, batch.s_ids)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._validation import check_int, check_option
from ...tasks.base import _check_split
from ...tasks.ioi import IOI, ORDERS, TEMPLATES, IOIExample
from ...tasks.natural import BPE_HINT, token_id

CORRUPTIONS = ("abc", "swap_names", "s2_swap")
ROLES = ("IO", "S1", "S2", "end")


@dataclass
class IOIBatch:
    """Clean and corrupted IOI prompts of one template, tokenised to one length, with answers and positions.

    Attributes
    ----------
    clean_ids, corrupt_ids : LongTensor ``[batch, pos]``
        Token ids of the clean prompts and of their corrupted counterparts (same positions, same length).
    io_ids, s_ids : LongTensor ``[batch]``
        Token ids of the clean prompt's indirect object and subject (with their leading space).
    positions : dict of str to LongTensor ``[batch]``
        Token positions of ``"IO"``, ``"S1"``, ``"S2"`` and ``"end"`` (the last token) in the clean prompts.
    prompts, corrupt_prompts : list of str
    examples, corrupt_examples : list of IOIExample
    template : str
        The template every prompt of the batch uses.
    corruption : str
        ``"abc"``, ``"swap_names"`` or ``"s2_swap"``.
    """

    clean_ids: torch.Tensor  # [batch, pos]
    corrupt_ids: torch.Tensor  # [batch, pos]
    io_ids: torch.Tensor  # [batch]
    s_ids: torch.Tensor  # [batch]
    positions: dict[str, torch.Tensor]  # role -> [batch]
    prompts: list[str]
    corrupt_prompts: list[str]
    examples: list[IOIExample]
    corrupt_examples: list[IOIExample]
    template: str
    corruption: str

    def __len__(self) -> int:
        return self.clean_ids.shape[0]

    def subset(self, index) -> "IOIBatch":
        """The rows ``index`` (a list, a slice or a tensor of row numbers) as a new batch."""
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).long()
        pick = rows.tolist()
        return IOIBatch(
            self.clean_ids[rows],
            self.corrupt_ids[rows],
            self.io_ids[rows],
            self.s_ids[rows],
            {k: v[rows] for k, v in self.positions.items()},
            [self.prompts[i] for i in pick],
            [self.corrupt_prompts[i] for i in pick],
            [self.examples[i] for i in pick],
            [self.corrupt_examples[i] for i in pick],
            self.template,
            self.corruption,
        )

    @classmethod
    def from_examples(cls, tok, examples, corruption: str = "abc", seed: int = 0) -> "IOIBatch":
        """Tokenise clean :class:`IOIExample` s of one template and their corruption into an aligned batch.

        For examples built by hand (other names, places, objects). ``seed`` is the IOI task seed that picks the
        third name of the ``"abc"`` corruption. ``ValueError`` when the examples use several templates, when a
        prompt and its corruption, or two prompts, tokenise to different lengths (a name of two tokens), or
        when IO or S is not one token.
        """
        owner = "IOIBatch.from_examples"
        check_option(corruption, "corruption", owner, CORRUPTIONS)
        check_int(seed, "seed", owner)
        examples = list(examples) if not isinstance(examples, IOIExample) else [examples]
        if not examples:
            raise ValueError(f"The 'examples' parameter of {owner} must hold at least one IOIExample. Got none.")
        task = IOI(seed=seed)
        examples = [task._check(ex) for ex in examples]
        templates = sorted({ex.template for ex in examples})
        if len(templates) > 1:
            raise ValueError(
                f"{owner}: the examples use {len(templates)} templates, whose prompts differ in length and in where "
                f"each name sits; patching needs aligned positions, so a batch takes one template (group the "
                f"examples by ex.template). Templates found: {templates[:3]}{' ...' if len(templates) > 3 else ''}"
            )
        corrupted = [getattr(task, corruption)(ex) for ex in examples]
        clean_rows = [tok(ex.prompt)["input_ids"] for ex in examples]
        corrupt_rows = [tok(ex.prompt)["input_ids"] for ex in corrupted]
        for ex, bad, c, x in zip(examples, corrupted, clean_rows, corrupt_rows):
            if len(c) != len(x):
                raise ValueError(
                    f"{owner}: the clean prompt {ex.prompt!r} is {len(c)} tokens but its {corruption!r} corruption "
                    f"{bad.prompt!r} is {len(x)} tokens with this tokenizer ({type(tok).__name__}), so their positions "
                    f"do not align. Every name must be one token (with its leading space): this needs {BPE_HINT}."
                )
        lengths = sorted({len(c) for c in clean_rows})
        if len(lengths) > 1:
            raise ValueError(
                f"{owner}: the prompts of one template tokenise to different lengths {lengths} with this tokenizer "
                f"({type(tok).__name__}); without padding they need names, places and objects of one token each: "
                f"{BPE_HINT}."
            )
        io_ids = torch.tensor([token_id(tok, " " + ex.io) for ex in examples])
        s_ids = torch.tensor([token_id(tok, " " + ex.s1) for ex in examples])
        found = [task.positions(ex, tok) for ex in examples]
        positions = {role: torch.tensor([p[role] for p in found]) for role in ROLES}
        return cls(
            clean_ids=torch.tensor(clean_rows),
            corrupt_ids=torch.tensor(corrupt_rows),
            io_ids=io_ids,
            s_ids=s_ids,
            positions=positions,
            prompts=[ex.prompt for ex in examples],
            corrupt_prompts=[ex.prompt for ex in corrupted],
            examples=examples,
            corrupt_examples=corrupted,
            template=templates[0],
            corruption=corruption,
        )


def _template(template, owner: str) -> str:
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(
                f"The 'template' parameter of {owner} must be an index in [0, {len(TEMPLATES) - 1}] or one of "
                f"ftanalysis.tasks.ioi.TEMPLATES. Got {template!r} instead."
            )
        return template
    return TEMPLATES[check_int(template, "template", owner, 0, len(TEMPLATES) - 1)]


def ioi_batch(
    tok,
    n: int,
    corruption: str = "abc",
    split: str = "test",
    seed: int = 0,
    order: str = "both",
    template: int | str = 0,
) -> IOIBatch:
    """``n`` clean IOI prompts of one template and their corrupted counterparts, tokenised and aligned.

    Wang et al. 2022 (arXiv 2211.00593). The prompts are the first ``n`` examples of the IOI task's ``split``
    (task seed ``seed``, name order ``order``) that use ``template``; the sequence is the same on every call
    and machine.

    Parameters
    ----------
    tok : tokenizer
        A BPE tokenizer that writes every name, place and object as one token with its leading space
        (SmolLM2's: ``model, tok = fta.zoo.load("smollm2-135m")``). Others are refused with the task's
        ``ValueError``.
    n : int
        Number of prompts, ``>= 1``.
    corruption : {"abc", "swap_names", "s2_swap"}, default="abc"
        ``"abc"`` replaces S2 by a third name (Wang et al.'s ABC distribution, the usual source for patching);
        ``"swap_names"`` exchanges IO and S everywhere; ``"s2_swap"`` replaces only S2 by IO.
    split : {"train", "val", "test"}, default="test"
    seed : int, default=0
        Seed of the IOI task: it picks the examples and the third name of ``"abc"``.
    order : {"both", "ABBA", "BABA"}, default="both"
        Name order in the first clause (ABBA: IO first).
    template : int or str, default=0
        An index into :data:`ftanalysis.tasks.ioi.TEMPLATES` or the template itself. Templates differ in
        length, so one batch holds one template: 0 is ``"When {A} and {B} went to the {place}, {S} gave a
        {object} to"`` (14 tokens with SmolLM2's tokenizer). To cover several, build one batch per template.

    Returns
    -------
    IOIBatch
        ``clean_ids`` and ``corrupt_ids`` ``[n, pos]``, ``io_ids`` and ``s_ids`` ``[n]`` (the clean prompt's
        indirect object and subject), ``positions`` of IO, S1, S2 and end, the prompts and the examples.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> from ftanalysis.probes.circuits import activation_patching, ioi_batch, logit_diff
    >>> model, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
    >>> batch = ioi_batch(tok, 8)  # doctest: +SKIP
    >>> result = activation_patching(model, batch.clean_ids, batch.corrupt_ids,
    ...                              logit_diff(batch.io_ids, batch.s_ids), per_position=False)  # doctest: +SKIP
    """
    owner = "ioi_batch"
    check_int(n, "n", owner, 1)
    check_option(corruption, "corruption", owner, CORRUPTIONS)
    _check_split(split, owner)
    check_int(seed, "seed", owner)
    check_option(order, "order", owner, ORDERS)
    chosen = _template(template, owner)
    task = IOI(order=order, seed=seed)
    task.check_tokenizer(tok)
    # the first n examples of the split's fixed sequence that use the template (13 templates: ~13 n draws)
    draws, found = 16 * n, []
    while len(found) < n:
        found = [ex for ex in task.examples(draws, split) if ex.template == chosen][:n]
        if len(found) < n:
            if draws >= 1024 * n:  # pragma: no cover - every template has probability 1/13
                raise RuntimeError(
                    f"{owner}: found only {len(found)} examples of template {chosen!r} in {draws} draws."
                )
            draws *= 4
    return IOIBatch.from_examples(tok, found, corruption=corruption, seed=seed)
