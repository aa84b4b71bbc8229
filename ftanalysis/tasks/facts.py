"""A subject -> object fact table ("knowledge" the base model memorises in pretraining).

::

    alice lives in  ->  oslo
    alice likes     ->  green

The table is drawn once from ``table_seed`` (not the task seed), so every model and every split sees the same
facts; the task is a memorisation task and its splits share their examples. Chance accuracy is ``1 /
(number of possible objects)``, averaged over relations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from .base import Example, Task
from .vocab import CITIES, COLORS, NAMES

RELATIONS = {"lives in": CITIES, "likes": COLORS}


@dataclass(frozen=True)
class Facts(Task):
    """Recall a fixed, seeded table of facts about people.

    Parameters
    ----------
    relations : tuple of str, default=("lives in", "likes")
    table_seed : int, default=0
        Seed of the fact table itself; keep it fixed to query what a zoo model learned.
    """

    relations: tuple[str, ...] = ("lives in", "likes")
    table_seed: int = 0

    name: ClassVar[str] = "facts"
    memorization: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.relations, str):
            object.__setattr__(self, "relations", (self.relations,))
        object.__setattr__(self, "relations", tuple(self.relations))
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown or not self.relations:
            raise ValueError(f"The 'relations' parameter of Facts must be a non-empty subset of {list(RELATIONS)}. Got {self.relations!r}.")

    @cached_property
    def table(self) -> dict[tuple[str, str], str]:
        """``{(subject, relation): object}`` for every name and relation."""
        rng = random.Random(f"facts-table|{self.table_seed}")
        return {(name, rel): rng.choice(RELATIONS[rel]) for rel in RELATIONS for name in NAMES}

    @property
    def chance(self) -> float:
        return sum(1 / len(RELATIONS[r]) for r in self.relations) / len(self.relations)

    def sample(self, rng: random.Random) -> Example:
        name, rel = rng.choice(NAMES), rng.choice(self.relations)
        return Example(prompt=f"{name} {rel}", answer=self.table[(name, rel)])
