"""Procedural tasks with exact answers over one shared word-level vocabulary, and English tasks for a real
BPE tokenizer (``ioi``, ``world_facts``, ``invented_facts``, ``box_tracking``, ``digit_arithmetic``,
``label_sentiment``: see :mod:`ftanalysis.tasks.natural`).

>>> import ftanalysis as fta
>>> task = fta.tasks.make("entity_tracking", n_boxes=3, seed=0)
>>> ex = task.examples(1, split="test")[0]
>>> ex.prompt.endswith("contains the")
True
"""

from __future__ import annotations

import dataclasses

from .arithmetic import ModularArithmetic
from .base import SPLITS, Example, Task, answer_loss, collate, score_examples, split_of
from .box_tracking import BoxTracking
from .classification import ClassificationTask
from .copying import Copy, Reverse
from .counting import Counting
from .digit_arithmetic import DigitArithmetic
from .entity_tracking import EntityTracking
from .facts import Facts
from .ioi import IOI, IOIExample
from .label_sentiment import LabelSentiment
from .mixture import Mixture, PretrainingMix
from .natural import NaturalTask, candidate_logits, last_position_logits
from .recall import AssociativeRecall
from .sentences import Intensity, LexicalSentiment, SentimentNegation, SubjectCategory
from .vocab import VOCAB, build_tokenizer
from .world_facts import InventedFacts, WorldFacts

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Add a task class to the registry under ``cls.name`` (usable as a decorator)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A task named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (
    EntityTracking, AssociativeRecall, ModularArithmetic, Counting, Copy, Reverse, Facts, PretrainingMix,
    SentimentNegation, SubjectCategory, LexicalSentiment, Intensity,
    IOI, WorldFacts, InventedFacts, BoxTracking, DigitArithmetic, LabelSentiment,
):
    register(_cls)


def available() -> list[str]:
    """Names accepted by :func:`make`."""
    return sorted(_REGISTRY)


def make(name: str, seed: int = 0, **options) -> Task:
    """Build a registered task by name, e.g. ``make("entity_tracking", n_boxes=5, seed=1)``."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown task {name!r}. Available tasks: {available()}.")
    cls = _REGISTRY[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "seed"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"Task {name!r} got unknown option(s) {unknown}. Accepted options: {accepted}.")
    return cls(seed=seed, **options)


__all__ = [
    "SPLITS", "VOCAB", "AssociativeRecall", "ClassificationTask", "Intensity", "LexicalSentiment", "SentimentNegation", "SubjectCategory", "Copy", "Counting", "EntityTracking", "Example", "Facts", "Mixture",
    "ModularArithmetic", "PretrainingMix", "Reverse", "Task", "answer_loss", "available", "build_tokenizer",
    "collate", "make", "register", "score_examples", "split_of",
    "BoxTracking", "DigitArithmetic", "IOI", "IOIExample", "InventedFacts", "LabelSentiment", "NaturalTask",
    "WorldFacts", "candidate_logits", "last_position_logits",
]
