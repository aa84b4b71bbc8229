"""Indirect object identification (IOI) in English, for a real BPE tokenizer.

Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small"
(arXiv 2211.00593). Two names are introduced; one of them (the subject, S) is repeated; the model should
complete with the other one (the indirect object, IO)::

    When Mary and John went to the store, John gave a drink to  ->  " Mary"     (ABBA: IO first)
    When John and Mary went to the store, John gave a drink to  ->  " Mary"     (BABA: S first)

Names, places and objects are one token each with their leading space in SmolLM2's tokenizer, so every prompt
of one template has the same length and the corruptions below keep token positions:

- :meth:`IOI.abc`: S2 replaced by a third name C ("..., Bob gave a drink to"), the corruption Wang et al.
  patch from (their ABC distribution), which removes the repeated-name signal;
- :meth:`IOI.swap_names`: IO and S exchanged everywhere, so the answer flips and the template is unchanged;
- :meth:`IOI.s2_swap`: only S2 replaced by IO, so the answer flips and the first clause is unchanged.

Examples are :class:`IOIExample` objects: an ``Example`` that also carries its structure (IO, S1, S2, the
template, the order, the place and the object); :meth:`IOI.positions` finds the IO, S1, S2 and end token
positions for a tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .._validation import check_option
from .base import Example
from .natural import NaturalTask, token_id

# Wang et al.'s templates (their BABA list, in the form "{A} and {B} ..., {S} ... to"), all ending before IO.
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a lot of fun at the {place}. {S} gave a {object} to",
    "Then, {A} and {B} were working at the {place}. {S} decided to give a {object} to",
    "Then, {A} and {B} were thinking about going to the {place}. {S} wanted to give a {object} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "While {A} and {B} were commuting to the {place}, {S} gave a {object} to",
    "After the lunch, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Afterwards, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
)
# The same structure in other words, none of them Wang et al.'s, three with a distractor name D (neither IO nor S):
# for fine-tuning on the mechanism without IOI's own templates (notebook 10). None starts with a name (a first word
# has no leading space, so it would be another token).
NEW_TEMPLATES = (
    "At the {place}, {A} and {B} talked for an hour. Then {S} handed a {object} to",
    "On Sunday {A} and {B} met at the {place}, and {S} passed a {object} to",
    "Before {A} and {B} left the {place}, {S} sent a {object} to",
    "Once {A} and {B} reached the {place}, {S} showed the {object} to",
    "While {D} stayed at home, {A} and {B} went to the {place}, and {S} brought a {object} to",
    "Although {D} was busy, {A} and {B} cleaned the {place}. Later {S} threw a {object} to",
    "After a call from {D}, {A} and {B} walked to the {place}, where {S} offered a {object} to",
)
TEMPLATE_SETS = {"wang": TEMPLATES, "new": NEW_TEMPLATES}
# Left out of Wang et al.'s list: "Friends {A} and {B} found a {object} at the {place}. {S} gave it to", which
# SmolLM2-135M answers with S in ABBA order (mean IO - S logit difference -3.0 over 6 prompts, measured).
# Common first names, each one token with a leading space in SmolLM2's tokenizer (checked by the tests);
# names that are also common words (Will, Rose, Grace, Mark, ...) are left out.
NAMES = (
    "Mary", "John", "Tom", "James", "Martin", "Amy", "Paul", "Anne", "Michael",
    "Jennifer", "Robert", "David", "William", "Richard", "Joseph", "Thomas", "Charles", "Daniel", "Matthew",
    "Anthony", "Steven", "Andrew", "Kevin", "Brian", "George", "Edward", "Jason", "Ryan", "Jacob",
    "Eric", "Stephen", "Scott", "Samuel", "Patrick", "Jack", "Henry", "Adam", "Peter", "Nathan",
    "Sarah", "Susan", "Jessica", "Karen", "Nancy", "Lisa", "Laura", "Emily", "Michelle", "Rachel",
    "Rebecca", "Helen", "Anna", "Emma", "Julia", "Alice", "Kate", "Lucy", "Jane", "Maria",
    "Linda", "Elizabeth", "Barbara", "Patricia",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "market")
OBJECTS = ("drink", "ring", "kiss", "bone", "basketball", "computer", "necklace", "snack", "book", "gift", "letter", "cake")
ORDERS = ("both", "ABBA", "BABA")


@dataclass(frozen=True)
class IOIExample(Example):
    """An IOI prompt with its structure.

    ``io`` is the answer name; ``s1`` the subject in the first clause and ``s2`` the name in the second
    (equal in a clean prompt; a third name after :meth:`IOI.abc`). ``order`` is ``"ABBA"`` when IO comes
    first in the pair. ``answer`` is always ``" " + io``.
    """

    io: str = ""
    s1: str = ""
    s2: str = ""
    distractor: str = ""  # the name D of a template with a distractor ("" in the others)
    template: str = ""
    order: str = ""
    place: str = ""
    object: str = ""


def _build(template: str, first: str, second: str, s2: str, io: str, s1: str, place: str, obj: str, d: str = "") -> IOIExample:
    prompt = template.format(A=first, B=second, S=s2, place=place, object=obj, D=d)
    order = "ABBA" if first == io else "BABA"
    return IOIExample(prompt=prompt, answer=" " + io, io=io, s1=s1, s2=s2, template=template, order=order, place=place,
                      object=obj, distractor=d)


@dataclass(frozen=True)
class IOI(NaturalTask):
    """Indirect object identification (Wang et al. 2022, arXiv 2211.00593) in English.

    ``"When Mary and John went to the store, John gave a drink to"`` -> ``" Mary"``; 13 templates, 63
    one-token names, 10 places, 12 objects.

    Parameters
    ----------
    order : {"both", "ABBA", "BABA"}, default="both"
        Name order in the first clause: ABBA puts IO first ("When Mary and John ..., John ..."), BABA puts S
        first. Wang et al. report both; models are often better at one of them.
    templates : {"wang", "new"}, default="wang"
        Wang et al.'s 13 templates, or 7 others of the same structure (:data:`NEW_TEMPLATES`, three of them with a
        distractor name that is neither IO nor S), to train on the mechanism without IOI's own wording.
    seed : int, default=0
        Seed of the example streams.

    Notes
    -----
    ``evaluate`` returns ``accuracy`` (IO is the argmax over the whole vocabulary), ``ioi_accuracy``
    (logit of IO > logit of S, Wang et al.'s two-name choice), ``logit_diff`` (mean of logit(IO) - logit(S)
    at the last position, their main metric) and the usual ``loss``, ``n``. ``chance`` is 0.5, the chance
    of the two-name choice; it is reported for ``accuracy`` too, where a model that picks one of the two
    names at random would score it (a uniform guess over the vocabulary would score far less).

    Examples
    --------
    >>> task = IOI(seed=0)
    >>> ex = task.examples(1)[0]
    >>> ex.answer == " " + ex.io and ex.prompt.count(ex.s1) == 2
    True
    >>> task.abc(ex).prompt.count(ex.s1)
    1
    """

    order: str = "both"
    templates: str = field(default="wang", metadata={"seed_omits_default": True})  # Wang et al.'s streams unchanged

    name: ClassVar[str] = "ioi"
    choice_key: ClassVar[str] = "ioi_accuracy"

    def __post_init__(self):
        check_option(self.order, "order", "IOI", ORDERS)
        check_option(self.templates, "templates", "IOI", tuple(TEMPLATE_SETS))

    @property
    def chance(self) -> float:
        return 0.5

    def single_tokens(self) -> set[str]:
        return {" " + w for w in NAMES + PLACES + OBJECTS}

    def sample(self, rng: random.Random) -> IOIExample:
        template = rng.choice(TEMPLATE_SETS[self.templates])
        order = rng.choice(("ABBA", "BABA")) if self.order == "both" else self.order
        io, s = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (io, s) if order == "ABBA" else (s, io)
        d = rng.choice([n for n in NAMES if n not in (io, s)]) if "{D}" in template else ""  # Wang's streams unchanged
        return _build(template, first, second, s, io, s, place, obj, d)

    def sample_structured(self, rng: random.Random) -> IOIExample:
        """Same as :meth:`sample` (an :class:`IOIExample` carries its structure)."""
        return self.sample(rng)

    def candidates(self, example: IOIExample) -> tuple[str, str]:
        return (" " + example.io, " " + example.s1)

    def _candidate_metrics(self, examples: list[Example], logits: torch.Tensor) -> dict:
        out = super()._candidate_metrics(examples, logits)
        out["logit_diff"] = float((logits[:, 0] - logits[:, 1]).mean())
        return out

    # ------------------------------------------------------------------ structure and corruptions
    @staticmethod
    def _check(example) -> IOIExample:
        if not isinstance(example, IOIExample) or not example.template:
            raise TypeError(f"Expected an IOIExample from IOI.examples(...) or IOI.sample(...). Got {type(example).__name__}.")
        return example

    @staticmethod
    def _pair(example: IOIExample) -> tuple[str, str]:
        """The two names of the first clause, in order."""
        return (example.io, example.s1) if example.order == "ABBA" else (example.s1, example.io)

    def prompt_parts(self, example: IOIExample) -> dict:
        """The example's structure: template, order, names by role (io, s1, s2), place and object."""
        ex = self._check(example)
        first, second = self._pair(ex)
        return {"template": ex.template, "order": ex.order, "A": first, "B": second, "io": ex.io, "s1": ex.s1,
                "s2": ex.s2, "place": ex.place, "object": ex.object}

    def abc(self, example: IOIExample, rng: random.Random | None = None) -> IOIExample:
        """The ABC corruption: S2 replaced by a third name C (not IO, not S).

        Same template, same token length (every name is one token); only the S2 token changes. ``answer``
        stays the clean IO, so clean and corrupted prompts share answer ids for a logit-difference metric.
        Without ``rng``, C is a fixed function of the task seed and the prompt.
        """
        ex = self._check(example)
        rng = rng or random.Random(f"ioi-abc|{self.seed}|{ex.prompt}")
        c = rng.choice([n for n in NAMES if n not in (ex.io, ex.s1, ex.s2, ex.distractor)])
        first, second = self._pair(ex)
        return _build(ex.template, first, second, c, ex.io, ex.s1, ex.place, ex.object, ex.distractor)

    def swap_names(self, example: IOIExample) -> IOIExample:
        """IO and S exchanged everywhere: the same template and order, with the answer flipped to the old S."""
        ex = self._check(example)
        swap = {ex.io: ex.s1, ex.s1: ex.io}
        first, second = self._pair(ex)
        return _build(ex.template, swap[first], swap[second], swap.get(ex.s2, ex.s2), ex.s1, ex.io, ex.place, ex.object, ex.distractor)

    def s2_swap(self, example: IOIExample) -> IOIExample:
        """Only S2 replaced by IO: the first clause is unchanged, the answer flips to the old S (order flips)."""
        ex = self._check(example)
        first, second = self._pair(ex)
        return _build(ex.template, first, second, ex.io, ex.s1, ex.io, ex.place, ex.object, ex.distractor)

    def positions(self, example: IOIExample, tok) -> dict[str, int]:
        """Token positions of ``IO``, ``S1``, ``S2`` and ``end`` (the last prompt token) in ``tok(prompt)``."""
        ex = self._check(example)
        ids = tok(ex.prompt)["input_ids"]
        io_id, s1_id, s2_id = (token_id(tok, " " + n) for n in (ex.io, ex.s1, ex.s2))
        return {
            "IO": ids.index(io_id),
            "S1": ids.index(s1_id),
            "S2": len(ids) - 1 - ids[::-1].index(s2_id),
            "end": len(ids) - 1,
        }
