"""Facts in English for a real decoder: real-world facts the base may know, and invented facts it cannot.

``world_facts``: a small table shipped in ``data/world_facts.json`` (capitals, the capital's country, main
languages, continents: 215 facts, every answer one token with a leading space in SmolLM2's tokenizer)::

    The capital of France is                        ->  " Paris"
    The city of Nairobi is the capital of           ->  " Kenya"
    The main language of Poland is                  ->  " Polish"
    Ghana is located on the continent of            ->  " Africa"

Each fact carries ``known_by_smollm2_135m``: whether SmolLM2-135M-Instruct's greedy next token (the
teacher-forced argmax at the last prompt position) is the answer (150 known, 65 not). Option ``subset`` picks
the facts the base knows, those it does not, or all. :func:`measure_known` recomputes the flag for any model; run
``python -m ftanalysis.tasks.world_facts`` to rewrite the shipped table with SmolLM2's measurement.

``invented_facts``: a seeded table of invented people, for knowledge injection (the base knows none of them)::

    Kalo Mirave lives in the city of                ->  " Vienna"     (template="train")
    The city where Kalo Mirave lives is             ->  " Vienna"     (template="paraphrase")

Both are memorisation tasks by default (every split holds the same facts; ``WorldFacts(holdout=True)`` splits
the facts instead, see Notes of each class). References: Meng et
al. 2022 (ROME, arXiv 2202.05262) for cloze-style factual prompts; Allen-Zhu and Li 2023 ("Physics of Language
Models 3.1", arXiv 2309.14316) for facts about invented people and why paraphrases test knowledge extraction
rather than memorised strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import ClassVar

from .._validation import check_int, check_option
from .base import Example
from .natural import NaturalTask, last_position_logits

DATA_PATH = Path(__file__).parent / "data" / "world_facts.json"
SUBSETS = ("all", "known", "unknown")
KNOWN_KEY = "known_by_smollm2_135m"
TOP_KEY = "smollm2_135m_top"


@lru_cache(maxsize=1)
def _load_table(path: str = str(DATA_PATH)) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def world_facts() -> list[dict]:
    """The shipped facts: dicts with ``relation``, ``subject``, ``prompt``, ``answer`` and the SmolLM2 fields."""
    return [dict(f) for f in _load_table()["facts"]]


def _freeze_relations(value, owner: str, accepted: tuple[str, ...]) -> tuple[str, ...]:
    relations = (value,) if isinstance(value, str) else tuple(value)
    unknown = [r for r in relations if r not in accepted]
    if unknown or not relations:
        raise ValueError(f"The 'relations' parameter of {owner} must be a non-empty subset of {list(accepted)}. Got {value!r} instead.")
    return relations


def measure_known(model, tok, facts: list[dict] | None = None, batch_size: int = 64) -> list[dict]:
    """Which facts a model gets right by greedy next token (teacher-forced argmax at the last prompt position).

    Parameters
    ----------
    model, tok : causal LM and its BPE tokenizer
        Every answer must be one token for ``tok``.
    facts : list of dict, default=None
        Dicts with ``prompt`` and ``answer``; default the shipped table (:func:`world_facts`).
    batch_size : int, default=64

    Returns
    -------
    list of dict
        One per fact, in order: ``{"prompt", "answer", "known": bool, "top": the argmax token as text}``.

    Examples
    --------
    >>> model, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
    >>> rows = measure_known(model, tok)  # doctest: +SKIP
    >>> sum(r["known"] for r in rows)  # doctest: +SKIP
    150
    """
    facts = world_facts() if facts is None else facts
    out = []
    logits = last_position_logits(model, tok, [f["prompt"] for f in facts], batch_size)  # [n, vocab]
    for fact, top in zip(facts, logits.argmax(-1).tolist()):
        text = tok.decode([top], clean_up_tokenization_spaces=False)
        out.append({"prompt": fact["prompt"], "answer": fact["answer"], "known": text == fact["answer"], "top": text})
    return out


def _dumps(table: dict) -> str:
    """The table as JSON with one fact per line (readable diffs when the measurement is redone)."""
    head = {k: v for k, v in table.items() if k != "facts"}
    lines = json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ',\n "facts": [\n'
    lines += ",\n".join("  " + json.dumps(f, ensure_ascii=False) for f in table["facts"])
    return lines + "\n ]\n}\n"


def update_table(model, tok, path: str | Path = DATA_PATH) -> dict:
    """Recompute ``known_by_smollm2_135m`` and ``smollm2_135m_top`` with ``model`` and rewrite the JSON table.

    Meant for SmolLM2-135M-Instruct (``fta.zoo.load("smollm2-135m")``), whose name the fields carry. Returns
    ``{"known": count, "unknown": count}``.
    """
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = measure_known(model, tok, table["facts"])
    for fact, row in zip(table["facts"], rows):
        fact[KNOWN_KEY], fact[TOP_KEY] = row["known"], row["top"]
    Path(path).write_text(_dumps(table), encoding="utf-8")
    _load_table.cache_clear()
    known = sum(r["known"] for r in rows)
    return {"known": known, "unknown": len(rows) - known}


@dataclass(frozen=True)
class WorldFacts(NaturalTask):
    """Real-world facts with one-token answers: "The capital of France is" -> " Paris".

    Parameters
    ----------
    subset : {"all", "known", "unknown"}, default="all"
        ``"known"``: the facts SmolLM2-135M-Instruct gets right by greedy next token (``known_by_smollm2_135m``);
        ``"unknown"``: the others (its accuracy there is 0 by construction). Fine-tuning on ``"unknown"``
        injects knowledge; ``"known"`` serves as a retention probe.
    relations : tuple of str, default=("capital", "capital_of", "language", "continent")
    holdout : bool, default=False
        ``False``: a memorisation task, every split holds the same facts. ``True``: facts are assigned to
        train / val / test by the hash of their prompt (80/10/10), so test accuracy measures whether training
        on some facts *elicits* others (only meaningful for facts the base may know; small subsets may leave a
        split with very few facts).
    seed : int, default=0
        Seed of the example streams (which facts, in which order).

    Notes
    -----
    "Known" means the base's greedy next token is the answer. A fact can be "unknown" because of phrasing
    rather than ignorance (e.g. the base writes " the" first); the table keeps the base's argmax token in
    ``smollm2_135m_top`` so that such cases can be inspected. Currencies were measured and left out: SmolLM2
    writes the nationality first ("the Swiss franc") or capitalises " Euro", so greedy scoring mislabels them.
    Languages are listed only for countries with one clearly dominant language; disputed capitals are left
    out. ``chance`` is the mean over facts of ``1 / (number of distinct answers of the fact's relation)``,
    which is also the chance of ``choice_accuracy`` (argmax among those answers).

    Examples
    --------
    >>> task = WorldFacts(subset="known")
    >>> ex = task.examples(1)[0]
    >>> ex.answer.startswith(" ")
    True
    """

    subset: str = "all"
    relations: tuple[str, ...] = ("capital", "capital_of", "language", "continent")
    holdout: bool = False

    name: ClassVar[str] = "world_facts"

    def __post_init__(self):
        check_option(self.subset, "subset", "WorldFacts", SUBSETS)
        accepted = tuple(_load_table()["relations"])
        object.__setattr__(self, "relations", _freeze_relations(self.relations, "WorldFacts", accepted))
        check_option(self.holdout, "holdout", "WorldFacts", (False, True))
        if not self.facts:
            raise ValueError(f"WorldFacts(subset={self.subset!r}, relations={self.relations}) selects no fact.")

    @property
    def memorization(self) -> bool:  # type: ignore[override]
        return not self.holdout

    @cached_property
    def facts(self) -> tuple[dict, ...]:
        """The selected facts, in table order."""
        keep = {"all": lambda f: True, "known": lambda f: f[KNOWN_KEY], "unknown": lambda f: not f[KNOWN_KEY]}[self.subset]
        return tuple(f for f in world_facts() if f["relation"] in self.relations and keep(f))

    @cached_property
    def _answers(self) -> dict[str, tuple[str, ...]]:
        """``{relation: distinct answers in the whole table}`` (the candidates of ``choice_accuracy``)."""
        out: dict[str, set[str]] = {}
        for f in world_facts():
            out.setdefault(f["relation"], set()).add(f["answer"])
        return {r: tuple(sorted(a)) for r, a in out.items()}

    @cached_property
    def _relation_of(self) -> dict[str, str]:
        return {f["prompt"]: f["relation"] for f in self.facts}

    @property
    def chance(self) -> float:
        return sum(1 / len(self._answers[f["relation"]]) for f in self.facts) / len(self.facts)

    def single_tokens(self) -> set[str]:
        return {a for r in self.relations for a in self._answers[r]}

    def candidates(self, example: Example) -> tuple[str, ...]:
        return self._answers[self._relation_of[example.prompt]]

    def sample(self, rng: random.Random) -> Example:
        fact = rng.choice(self.facts)
        return Example(prompt=fact["prompt"], answer=fact["answer"])


# ---------------------------------------------------------------------------------------------------------------
# Invented facts

INVENTED_RELATIONS = {
    # relation: (objects, training template, paraphrase templates); every object is one token after a space.
    "city": (
        ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Moscow", "Cairo", "Sydney", "Chicago",
         "Boston", "Dublin", "Vienna", "Prague", "Lisbon", "Athens", "Oslo", "Seoul", "Toronto", "Miami"),
        "{name} lives in the city of",
        ("The city where {name} lives is", "{name} has a home in the city of"),
    ),
    "job": (
        ("doctor", "teacher", "lawyer", "farmer", "nurse", "baker", "pilot", "writer", "singer", "painter"),
        "{name} works as a",
        ("By profession, {name} is a", "{name} earns a living as a"),
    ),
    "color": (
        ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "orange"),
        "{name}'s favorite color is",
        ("The color that {name} likes best is", "Of all colors, {name} likes best the color"),
    ),
}
TEMPLATE_KINDS = ("train", "paraphrase")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def invented_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct invented two-part names ("Kalo Mirave"), a fixed function of ``seed``."""
    rng = random.Random(f"invented-names|{seed}")

    def word(syllables: int) -> str:
        return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)).capitalize()

    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{word(2)} {word(3)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclass(frozen=True)
class InventedFacts(NaturalTask):
    """Facts about invented people, for knowledge injection: "Kalo Mirave lives in the city of" -> " Vienna".

    Parameters
    ----------
    n_people : int, default=100
        Number of invented people (names are two or more tokens each; objects are one token).
    table_seed : int, default=0
        Seed of the names and the fact table (not of the example streams): keep it fixed to compare models.
    template : {"train", "paraphrase"}, default="train"
        ``"train"``: one fixed template per relation, the one to fine-tune on. ``"paraphrase"``: the same facts
        asked in two other wordings per relation, to test whether an injected fact generalises beyond the
        trained string.
    relations : tuple of str, default=("city", "job", "color")
        20 cities, 10 jobs, 10 colours; each fact is drawn uniformly from its relation's objects.
    seed : int, default=0
        Seed of the example streams.

    Notes
    -----
    A memorisation task: every split holds the same facts (test accuracy on ``template="train"`` is recall of
    the trained strings; use ``template="paraphrase"`` for generalisation). The base model cannot know them;
    measured with SmolLM2-135M-Instruct, its accuracy is at the level of a constant guess (see the tests).
    ``chance`` is the mean over relations of ``1 / (number of objects)``, also the chance of
    ``choice_accuracy`` (argmax among the relation's objects).

    Examples
    --------
    >>> task = InventedFacts(n_people=5)
    >>> ex = task.examples(1)[0]
    >>> ex.answer in {" " + o for rel in task.relations for o in INVENTED_RELATIONS[rel][0]}
    True
    """

    n_people: int = 100
    table_seed: int = 0
    template: str = "train"
    relations: tuple[str, ...] = ("city", "job", "color")

    name: ClassVar[str] = "invented_facts"
    memorization: ClassVar[bool] = True

    def __post_init__(self):
        check_int(self.n_people, "n_people", "InventedFacts", 1, 10_000)
        check_int(self.table_seed, "table_seed", "InventedFacts")
        check_option(self.template, "template", "InventedFacts", TEMPLATE_KINDS)
        object.__setattr__(self, "relations", _freeze_relations(self.relations, "InventedFacts", tuple(INVENTED_RELATIONS)))

    @cached_property
    def people(self) -> tuple[str, ...]:
        return tuple(invented_names(self.n_people, self.table_seed))

    @cached_property
    def table(self) -> dict[tuple[str, str], str]:
        """``{(person, relation): object}`` for every person and every relation (independent of ``relations``)."""
        rng = random.Random(f"invented-facts-table|{self.table_seed}")
        return {(p, rel): rng.choice(INVENTED_RELATIONS[rel][0]) for rel in INVENTED_RELATIONS for p in self.people}

    @cached_property
    def _relation_of_answer(self) -> dict[str, str]:
        return {" " + o: rel for rel in self.relations for o in INVENTED_RELATIONS[rel][0]}

    @property
    def chance(self) -> float:
        return sum(1 / len(INVENTED_RELATIONS[r][0]) for r in self.relations) / len(self.relations)

    def single_tokens(self) -> set[str]:
        return set(self._relation_of_answer)

    def candidates(self, example: Example) -> tuple[str, ...]:
        # objects of different relations never coincide, so the answer names its relation
        return tuple(" " + o for o in INVENTED_RELATIONS[self._relation_of_answer[example.answer]][0])

    def sample(self, rng: random.Random) -> Example:
        person, rel = rng.choice(self.people), rng.choice(self.relations)
        _, train_template, paraphrases = INVENTED_RELATIONS[rel]
        template = train_template if self.template == "train" else rng.choice(paraphrases)
        return Example(prompt=template.format(name=person), answer=" " + self.table[(person, rel)])


if __name__ == "__main__":  # pragma: no cover - rewrites the shipped table with SmolLM2's measurement
    import torch

    from ..zoo import load

    torch.manual_seed(0)
    model, tok = load("smollm2-135m")
    print(update_table(model, tok))
