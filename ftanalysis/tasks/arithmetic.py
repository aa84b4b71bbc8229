"""Modular arithmetic: ``a op b mod p``.

::

    12 + 7 mod 23 =  ->  19

Operands are uniform in ``[0, modulus)``; the answer is one number token. With ``holdout=True`` (default) the
splits hold out operand pairs, so test accuracy measures generalisation to unseen pairs; with
``holdout=False`` the whole table is shared by the splits and the task measures recall of the table.
Chance accuracy is ``1 / modulus``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_int
from .base import Example, Task
from .vocab import NUMBERS

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ModularArithmetic(Task):
    """``a op b mod modulus`` for ``op`` in ``+``, ``-``, ``*``.

    Parameters
    ----------
    op : {"+", "-", "*"}, default="+"
    modulus : int, default=23
        In [2, 100] (answers are the number tokens 0-99).
    holdout : bool, default=True
        Hold out operand pairs between splits (generalisation) or share the table (recall).
    """

    op: str = "+"
    modulus: int = 23
    holdout: bool = True

    name: ClassVar[str] = "modular_arithmetic"

    def __post_init__(self):
        if self.op not in OPERATIONS:
            raise ValueError(f"The 'op' parameter of ModularArithmetic must be one of {list(OPERATIONS)}. Got {self.op!r}.")
        check_int(self.modulus, "modulus", "ModularArithmetic", 2, len(NUMBERS))

    @property
    def memorization(self) -> bool:  # type: ignore[override]
        return not self.holdout

    @property
    def chance(self) -> float:
        return 1 / self.modulus

    def sample(self, rng: random.Random) -> Example:
        a, b = rng.randrange(self.modulus), rng.randrange(self.modulus)
        result = OPERATIONS[self.op](a, b) % self.modulus
        return Example(prompt=f"{a} {self.op} {b} mod {self.modulus} =", answer=str(result))
