"""A weighted mixture of tasks, and the zoo's pretraining mix.

The pretraining mix is what the zoo's bases are trained on; its *test* split is the held-out "pretraining
mix" on which forgetting is measured after fine-tuning (``fta.tasks.make("pretraining_mix")``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .._validation import check_float
from .arithmetic import ModularArithmetic
from .base import Example, Task, _check_split, check_model_tokenizer, score_examples
from .copying import Copy
from .counting import Counting
from .entity_tracking import EntityTracking
from .facts import Facts
from .recall import AssociativeRecall


@dataclass(frozen=True)
class Mixture(Task):
    """Draw each example from one of ``tasks`` with probability proportional to ``weights``.

    ``evaluate`` scores every component on its own ``n`` examples and reports ``<task>/accuracy`` and
    ``<task>/loss`` for each, plus their unweighted means as ``accuracy`` and ``loss``.
    """

    tasks: tuple[Task, ...] = ()
    weights: tuple[float, ...] = ()

    name: ClassVar[str] = "mixture"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights) or (1.0,) * len(self.tasks))
        if not self.tasks or not all(isinstance(t, Task) for t in self.tasks):
            raise ValueError(f"The 'tasks' parameter of Mixture must be a non-empty sequence of Task. Got {self.tasks!r}.")
        if len(self.weights) != len(self.tasks):
            raise ValueError(f"Mixture got {len(self.tasks)} tasks but {len(self.weights)} weights.")
        for w in self.weights:
            check_float(w, "weights", "Mixture", low=0.0, low_open=True)
        names = self.component_names()
        if len(set(names)) != len(names):
            raise ValueError(f"Mixture components need distinct names; got {names}.")

    def component_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def chance(self) -> float:
        return sum(t.chance for t in self.tasks) / len(self.tasks)

    def _pick(self, rng: random.Random) -> Task:
        return rng.choices(self.tasks, weights=self.weights, k=1)[0]

    def sample(self, rng: random.Random) -> Example:
        return self._pick(rng).sample(rng)

    def _draw(self, rng: random.Random, split: str) -> Example:
        return self._pick(rng)._draw(rng, split)

    def words(self) -> set[str]:
        return set().union(*(t.words() for t in self.tasks))

    def evaluate(self, model, tok, split: str = "test", n: int = 512, batch_size: int = 256) -> dict:
        _check_split(split, "Mixture.evaluate")
        self.check_tokenizer(tok)
        check_model_tokenizer(model, tok)
        out: dict = {}
        for task in self.tasks:
            scores = score_examples(model, tok, task.examples(n, split), batch_size=batch_size)
            out[f"{task.name}/accuracy"] = scores["accuracy"]
            out[f"{task.name}/loss"] = scores["loss"]
        out["accuracy"] = sum(out[f"{t.name}/accuracy"] for t in self.tasks) / len(self.tasks)
        out["loss"] = sum(out[f"{t.name}/loss"] for t in self.tasks) / len(self.tasks)
        out["n"] = n * len(self.tasks)
        out["chance"] = self.chance
        return out


# The zoo's pretraining recipe. Associative recall and copying are in the mix because a copying / induction
# task is what makes entity tracking learnable in a tiny model: without one it sits at chance.
PRETRAINING_COMPONENTS: tuple[tuple[Task, float], ...] = (
    (EntityTracking(n_boxes=(2, 7)), 0.35),
    (AssociativeRecall(n_pairs=(2, 8)), 0.20),
    (Copy(length=(3, 6)), 0.15),
    (ModularArithmetic(op="+", modulus=23, holdout=False), 0.10),
    (Counting(token="a"), 0.10),
    (Facts(), 0.10),
)


@dataclass(frozen=True)
class PretrainingMix(Mixture):
    """The mixture the zoo's bases are pretrained on (see ``PRETRAINING_COMPONENTS``)."""

    tasks: tuple[Task, ...] = tuple(t for t, _ in PRETRAINING_COMPONENTS)
    weights: tuple[float, ...] = tuple(w for _, w in PRETRAINING_COMPONENTS)

    name: ClassVar[str] = "pretraining_mix"
