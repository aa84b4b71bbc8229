"""Counting the occurrences of one token, as in Jain et al. 2024.

Jain et al., "Mechanistically analyzing the effects of fine-tuning on procedurally defined tasks" (ICLR 2024,
arXiv 2311.12786) pretrain a model to count token ``a`` and fine-tune it to count token ``b`` with the *same*
prompt, then ask whether the old capability survives under a thin "wrapper". The prompt therefore does not
name the counted token; the task option ``token`` does::

    count : b a c a d a .  ->  3        (token="a")
    count : b a c a d a .  ->  1        (token="b")

Sequences are drawn from the letters ``a``-``h``; the count of ``token`` is uniform in ``[0, max_count]``,
so chance accuracy is ``1 / (max_count + 1)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_int
from .base import Example, Task

ALPHABET = list("abcdefgh")


@dataclass(frozen=True)
class Counting(Task):
    """Count how many times ``token`` occurs in a sequence of letters.

    Parameters
    ----------
    token : str, default="a"
        The counted letter, one of ``a``-``h``.
    length : (int, int), default=(6, 12)
        Inclusive range of the sequence length.
    max_count : int, default=6
    """

    token: str = "a"
    length: tuple[int, int] = (6, 12)
    max_count: int = 6

    name: ClassVar[str] = "counting"

    def __post_init__(self):
        if self.token not in ALPHABET:
            raise ValueError(f"The 'token' parameter of Counting must be one of {ALPHABET}. Got {self.token!r}.")
        if isinstance(self.length, list):
            object.__setattr__(self, "length", tuple(self.length))
        if not isinstance(self.length, tuple) or len(self.length) != 2:
            raise ValueError(f"The 'length' parameter of Counting must be a (low, high) pair. Got {self.length!r}.")
        low = check_int(self.length[0], "length[0]", "Counting", 1, 60)
        check_int(self.length[1], "length[1]", "Counting", low, 60)
        check_int(self.max_count, "max_count", "Counting", 1, low)

    @property
    def chance(self) -> float:
        return 1 / (self.max_count + 1)

    def sample(self, rng: random.Random) -> Example:
        n = rng.randint(*self.length)
        count = rng.randint(0, self.max_count)
        others = [c for c in ALPHABET if c != self.token]
        seq = [self.token] * count + [rng.choice(others) for _ in range(n - count)]
        rng.shuffle(seq)
        return Example(prompt=f"count : {' '.join(seq)} .", answer=str(count))
