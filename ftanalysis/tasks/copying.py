"""Copying and reversing a list of symbols (multi-token answers).

::

    copy : d a k e =  ->  d a k e
    reverse : d a k e =  ->  e k a d

An example is correct only when every answer token is right; chance is ``(1/26) ** length``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_int
from .base import Example, Task
from .vocab import LOWER


@dataclass(frozen=True)
class _SymbolList(Task):
    length: tuple[int, int] = (3, 6)

    def __post_init__(self):
        if isinstance(self.length, int):
            object.__setattr__(self, "length", (self.length, self.length))
        if isinstance(self.length, list):
            object.__setattr__(self, "length", tuple(self.length))
        owner = type(self).__name__
        if not isinstance(self.length, tuple) or len(self.length) != 2:
            raise ValueError(f"The 'length' parameter of {owner} must be an int or a (low, high) pair. Got {self.length!r}.")
        low = check_int(self.length[0], "length[0]", owner, 1, 40)
        check_int(self.length[1], "length[1]", owner, low, 40)

    @property
    def chance(self) -> float:
        return (1 / len(LOWER)) ** self.length[0]

    def _symbols(self, rng: random.Random) -> list[str]:
        return [rng.choice(LOWER) for _ in range(rng.randint(*self.length))]


@dataclass(frozen=True)
class Copy(_SymbolList):
    """Repeat a list of letters. ``length``: inclusive range of the list length, default (3, 6)."""

    name: ClassVar[str] = "copy"

    def sample(self, rng: random.Random) -> Example:
        symbols = self._symbols(rng)
        return Example(prompt=f"copy : {' '.join(symbols)} =", answer=" ".join(symbols))


@dataclass(frozen=True)
class Reverse(_SymbolList):
    """Write a list of letters backwards. ``length``: inclusive range of the list length, default (3, 6)."""

    name: ClassVar[str] = "reverse"

    def sample(self, rng: random.Random) -> Example:
        symbols = self._symbols(rng)
        return Example(prompt=f"reverse : {' '.join(symbols)} =", answer=" ".join(reversed(symbols)))
