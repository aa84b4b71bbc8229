"""Arithmetic written in digits, for a real BPE tokenizer: ``"12 + 35 ="`` -> ``" 47"``.

The answer is the exact result; it may be several tokens (SmolLM2's tokenizer writes every digit as its own
token, and the leading space as a separate token before a number: ``" 47"`` is ``["Ġ", "4", "7"]``), and an
example is right only when every answer token is the argmax, i.e. when greedy decoding writes the whole
number. Used to study how fine-tuning changes arithmetic in a pretrained LM (e.g. Nikankin et al. 2024,
"Arithmetic Without Algorithms: Language Models Solve Math With a Bag of Heuristics", arXiv 2410.21272; Stolfo
et al. 2023, "A Mechanistic Interpretation of Arithmetic Reasoning in Language Models", arXiv 2305.15054).

Operands have exactly ``digits`` digits (0-9 when ``digits=1``). For ``-`` the larger operand comes first, so
results are never negative. Splits hold out operand pairs (by the hash of the prompt), so test accuracy
measures generalisation to unseen pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from .._validation import check_int, check_option
from .base import Example
from .natural import NaturalTask

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
MAX_DIGITS = 4


def operand_range(digits: int) -> tuple[int, int]:
    """Inclusive ``(low, high)`` of the operands with exactly ``digits`` digits (``(0, 9)`` for one digit)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


@lru_cache(maxsize=16)
def n_results(op: str, digits: int) -> int:
    """How many distinct results ``op`` can give on operands of ``digits`` digits (for ``-``: non-negative)."""
    low, high = operand_range(digits)
    if op == "+":
        return 2 * (high - low) + 1  # every sum from 2 low to 2 high occurs
    if op == "-":
        return high - low + 1  # every difference from 0 to high - low occurs
    import numpy as np

    seen = np.zeros(high * high + 1, dtype=bool)  # about 100 MB at 4 digits, once
    b = np.arange(low, high + 1)
    for a in range(low, high + 1):
        seen[a * b[b >= a]] = True  # products are symmetric: b >= a suffices
    return int(seen.sum())


@dataclass(frozen=True)
class DigitArithmetic(NaturalTask):
    """``"12 + 35 ="`` -> ``" 47"``: exact arithmetic in digits, the whole answer must be right.

    Parameters
    ----------
    op : {"+", "-", "*"}, default="+"
    digits : int, default=2
        Digits of each operand, in [1, 4]. With ``digits=1`` the whole table has only 100 pairs, so each split
        holds few distinct prompts.
    seed : int, default=0
        Seed of the example streams.

    Notes
    -----
    ``chance`` is ``1 / (number of distinct possible results)``: the accuracy of a uniform guess among the
    results the operation can produce (e.g. 1/179 for two-digit addition). It is a floor, not a baseline to
    beat: a model that knows only the number of digits does much better.

    Examples
    --------
    >>> task = DigitArithmetic(op="+", digits=2)
    >>> ex = task.examples(1)[0]
    >>> a, _, b, _ = ex.prompt.split()
    >>> int(ex.answer) == int(a) + int(b)
    True
    """

    op: str = "+"
    digits: int = 2

    name: ClassVar[str] = "digit_arithmetic"

    def __post_init__(self):
        check_option(self.op, "op", "DigitArithmetic", tuple(OPERATIONS))
        check_int(self.digits, "digits", "DigitArithmetic", 1, MAX_DIGITS)

    @property
    def chance(self) -> float:
        return 1 / n_results(self.op, self.digits)

    def single_tokens(self) -> set[str]:
        # a BPE tokenizer writes the operator and "=" with their leading space as one token (GPT-2, SmolLM2);
        # the zoo's word-level tokenizer drops the space, so it is refused rather than scored.
        return {" " + self.op, " ="}

    def sample(self, rng: random.Random) -> Example:
        low, high = operand_range(self.digits)
        a, b = rng.randint(low, high), rng.randint(low, high)
        if self.op == "-" and b > a:
            a, b = b, a
        return Example(prompt=f"{a} {self.op} {b} =", answer=f" {OPERATIONS[self.op](a, b)}")
