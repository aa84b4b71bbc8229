"""Entity tracking: which object is in the queried box?

Kim and Schuster 2023, "Entity Tracking in Language Models" (arXiv 2305.02363); the format of
Prakash et al. 2024, "Fine-Tuning Enhances Existing Mechanisms" (arXiv 2402.14811)::

    the apple is in box F , the key is in box C , the cup is in box Q . box F contains the  ->  apple

Objects and box labels are drawn without replacement; the queried box is uniform among the ``n_boxes``
boxes, so chance accuracy is ``1 / n_boxes``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_int
from .base import Example, Task
from .vocab import OBJECTS, UPPER


def _box_range(n_boxes, owner: str) -> tuple[int, int]:
    """Accept an int or an inclusive ``(low, high)`` pair; return the pair."""
    if isinstance(n_boxes, (tuple, list)):
        if len(n_boxes) != 2:
            raise ValueError(f"The 'n_boxes' parameter of {owner} must be an int or a (low, high) pair. Got {n_boxes!r}.")
        low = check_int(n_boxes[0], "n_boxes[0]", owner, 2, len(OBJECTS))
        high = check_int(n_boxes[1], "n_boxes[1]", owner, low, len(OBJECTS))
        return low, high
    value = check_int(n_boxes, "n_boxes", owner, 2, min(len(OBJECTS), len(UPPER)))
    return value, value


@dataclass(frozen=True)
class EntityTracking(Task):
    """Track which object was put in which box.

    Parameters
    ----------
    n_boxes : int or (int, int), default=3
        Number of box-object pairs in the context, or an inclusive range drawn uniformly per example.
    seed : int, default=0
        Seed of the example streams.
    """

    n_boxes: int | tuple[int, int] = 3

    name: ClassVar[str] = "entity_tracking"

    def __post_init__(self):
        _box_range(self.n_boxes, "EntityTracking")
        if isinstance(self.n_boxes, list):
            object.__setattr__(self, "n_boxes", tuple(self.n_boxes))

    @property
    def chance(self) -> float:
        low, high = _box_range(self.n_boxes, "EntityTracking")
        return sum(1 / n for n in range(low, high + 1)) / (high - low + 1)

    def sample(self, rng: random.Random) -> Example:
        low, high = _box_range(self.n_boxes, "EntityTracking")
        n = rng.randint(low, high)
        objects = rng.sample(OBJECTS, n)
        boxes = rng.sample(UPPER, n)
        query = rng.randrange(n)
        return Example(prompt=format_context(objects, boxes) + f" box {boxes[query]} contains the", answer=objects[query])


def format_context(objects: list[str], boxes: list[str]) -> str:
    """``"the apple is in box F , the key is in box C ."`` for the given pairs."""
    clauses = [f"the {obj} is in box {box}" for obj, box in zip(objects, boxes)]
    return " , ".join(clauses) + " ."
