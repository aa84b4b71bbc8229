"""Associative recall: return the value written before a key.

The pairs are written value first, then key, in the same order as the entity-tracking sentences
(object, then box), which is what makes this task a useful companion in the pretraining mix::

    recall : apple F key C cup Q . C  ->  key

A copying / induction task in the mix is what makes entity tracking learnable for tiny models
(measured; see the zoo model card). Chance accuracy is ``1 / n_pairs``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .base import Example, Task
from .entity_tracking import _box_range
from .vocab import OBJECTS, UPPER


@dataclass(frozen=True)
class AssociativeRecall(Task):
    """Recall the object paired with a queried key.

    Parameters
    ----------
    n_pairs : int or (int, int), default=(2, 8)
        Number of value-key pairs, or an inclusive range drawn per example.
    """

    n_pairs: int | tuple[int, int] = (2, 8)

    name: ClassVar[str] = "associative_recall"

    def __post_init__(self):
        _box_range(self.n_pairs, "AssociativeRecall")
        if isinstance(self.n_pairs, list):
            object.__setattr__(self, "n_pairs", tuple(self.n_pairs))

    @property
    def chance(self) -> float:
        low, high = _box_range(self.n_pairs, "AssociativeRecall")
        return sum(1 / n for n in range(low, high + 1)) / (high - low + 1)

    def sample(self, rng: random.Random) -> Example:
        low, high = _box_range(self.n_pairs, "AssociativeRecall")
        n = rng.randint(low, high)
        values = rng.sample(OBJECTS, n)
        keys = rng.sample(UPPER, n)
        query = rng.randrange(n)
        pairs = " ".join(f"{v} {k}" for v, k in zip(values, keys))
        return Example(prompt=f"recall : {pairs} . {keys[query]}", answer=values[query])
