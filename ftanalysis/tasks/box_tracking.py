"""Entity tracking in English for a real BPE tokenizer: which object is in the queried box?

Kim and Schuster 2023, "Entity Tracking in Language Models" (arXiv 2305.02363), in the format of Prakash et al.
2024, "Fine-Tuning Enhances Existing Mechanisms: A Case Study on Entity Tracking" (arXiv 2402.14811)::

    The apple is in box F, the key is in box Q, the coin is in box B. Box Q contains the  ->  " key"

Box labels are capital letters (one token each as " F"); objects are one token each with a leading space in
SmolLM2's tokenizer. Objects and labels are drawn without replacement and the queried box is uniform among the
``n_boxes`` boxes, so a guess among the listed objects is right with probability ``1 / n_boxes``. The objects are
split once and for all into 28 training objects and 12 held-out ones (option ``objects``), so a fine-tune on
``objects="train"`` can be tested on objects it never saw.

SmolLM2-135M-Instruct does not track entities in this format (argmax among the listed objects near chance at
3, 5 and 7 boxes; ``reference/real-decoder.md``), and a short LoRA fine-tune installs the skill.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_int, check_option
from .base import Example
from .natural import NaturalTask

# One token each after a space in SmolLM2's tokenizer (checked by the tests); the split is fixed (70/30).
TRAIN_OBJECTS = (
    "apple", "key", "coin", "book", "ring", "cup", "pen", "hat", "ball", "lamp", "shoe", "bell", "drum", "egg",
    "fork", "glove", "jar", "kite", "map", "sock", "toy", "bottle", "brush", "candle", "phone", "clock", "knife", "spoon",
)
HELDOUT_OBJECTS = ("plate", "bowl", "shirt", "wallet", "ticket", "stone", "shell", "feather", "button", "doll", "mirror", "camera")
OBJECT_SETS = {"all": TRAIN_OBJECTS + HELDOUT_OBJECTS, "train": TRAIN_OBJECTS, "heldout": HELDOUT_OBJECTS}
LABELS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
MAX_BOXES = 10


def _box_range(n_boxes, owner: str) -> tuple[int, int]:
    """Accept an int or an inclusive ``(low, high)`` pair in [2, 10]; return the pair."""
    if isinstance(n_boxes, (tuple, list)):
        if len(n_boxes) != 2:
            raise ValueError(f"The 'n_boxes' parameter of {owner} must be an int or a (low, high) pair. Got {n_boxes!r} instead.")
        low = check_int(n_boxes[0], "n_boxes[0]", owner, 2, MAX_BOXES)
        return low, check_int(n_boxes[1], "n_boxes[1]", owner, low, MAX_BOXES)
    value = check_int(n_boxes, "n_boxes", owner, 2, MAX_BOXES)
    return value, value


def format_boxes(objects: list[str], labels: list[str], query: str) -> str:
    """``"The apple is in box F, the key is in box Q. Box Q contains the"`` for the given pairs and query label."""
    clauses = [f"the {obj} is in box {label}" for obj, label in zip(objects, labels)]
    context = ", ".join(clauses)
    return f"{context[0].upper()}{context[1:]}. Box {query} contains the"


@dataclass(frozen=True)
class BoxTracking(NaturalTask):
    """Which object is in the queried box (Prakash et al. 2024's format, arXiv 2402.14811).

    ``"The apple is in box F, the key is in box Q, the coin is in box B. Box Q contains the"`` -> ``" key"``.

    Parameters
    ----------
    n_boxes : int or (int, int), default=3
        Number of box-object pairs in [2, 10], or an inclusive range drawn uniformly per example (train on a
        range, test on each size).
    objects : {"all", "train", "heldout"}, default="all"
        Which objects fill the boxes: the 28 training objects, the 12 held-out ones, or all 40. Fine-tune on
        ``"train"`` and evaluate on ``"heldout"`` to measure generalisation to unseen objects.
    seed : int, default=0
        Seed of the example streams.

    Notes
    -----
    ``evaluate`` adds ``choice_accuracy``: the answer has the highest logit among the objects listed in the
    prompt (Prakash et al.'s measure). ``chance`` is ``1 / n_boxes`` (averaged over the range), the chance of
    ``choice_accuracy``; ``accuracy`` (argmax over the whole vocabulary) can only be lower.

    Examples
    --------
    >>> task = BoxTracking(n_boxes=3, seed=0)
    >>> ex = task.examples(1)[0]
    >>> ex.prompt.endswith("contains the") and ex.answer in task.candidates(ex)
    True
    """

    n_boxes: int | tuple[int, int] = 3
    objects: str = "all"

    name: ClassVar[str] = "box_tracking"

    def __post_init__(self):
        _box_range(self.n_boxes, "BoxTracking")
        if isinstance(self.n_boxes, list):
            object.__setattr__(self, "n_boxes", tuple(self.n_boxes))
        check_option(self.objects, "objects", "BoxTracking", tuple(OBJECT_SETS))

    @property
    def chance(self) -> float:
        low, high = _box_range(self.n_boxes, "BoxTracking")
        return sum(1 / n for n in range(low, high + 1)) / (high - low + 1)

    def single_tokens(self) -> set[str]:
        return {" " + w for w in OBJECT_SETS[self.objects] + LABELS}

    def sample(self, rng: random.Random) -> Example:
        low, high = _box_range(self.n_boxes, "BoxTracking")
        n = rng.randint(low, high)
        objects = rng.sample(OBJECT_SETS[self.objects], n)
        labels = rng.sample(LABELS, n)
        query = rng.randrange(n)
        return Example(prompt=format_boxes(objects, labels, labels[query]), answer=" " + objects[query])

    def candidates(self, example: Example) -> tuple[str, ...]:
        """The objects listed in the prompt, in order."""
        clauses = example.prompt.split(". Box ")[0].split(", ")
        return tuple(" " + clause.split(" is in box ")[0].split(" ", 1)[1] for clause in clauses)
