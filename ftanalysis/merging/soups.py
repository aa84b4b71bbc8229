"""Model soups: average the weights of several fine-tunes of one pretrained model.

Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon, Kornblith, Schmidt
2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time" (ICML 2022, arXiv 2203.05482)::

    uniform soup:  theta = (1 / k) sum_i theta_i
    greedy soup:   sort the ingredients by held-out accuracy (best first); start from the best; add the next
                   ingredient if the held-out accuracy of the average with it is strictly higher; else skip it

The greedy soup is never worse than the best ingredient *on the held-out data it was selected on*. Soups
need ingredients that share an initialisation (one pretrained model): averaging unrelated networks fails.
Bundled results of the paper's code (72 CLIP ViT-B/32 fine-tunes on ImageNet): best single 80.39%, uniform
79.97%, greedy 81.03%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, ClassVar, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch

from .base import MergeRule
from .task_vector import TaskVector, _parameters, check_finite, materialize, task_vectors


def _average(models: Sequence, owner: str = "soup") -> object:
    """The parameter-wise mean of models (or state dicts) of one architecture, as a new model / dict."""
    template = materialize(models[0], owner)
    check_finite(_parameters(template)[0], f"The 'models' parameter of {owner}: model 0")
    if len(models) == 1:
        return TaskVector.from_models(template, template).apply_to(template, 0.0)
    others = task_vectors(template, models, owner)[1:]  # model i's vector is named "model i"
    return (sum(others) / len(models)).apply_to(template)


@dataclass(frozen=True, repr=False)
class UniformSoup(MergeRule):
    """Uniform soup (Wortsman et al. 2022, arXiv 2203.05482): the mean of the ingredients' weights.

    ``merge(base, models)`` ignores ``base`` except as a type check (pass None); the result is a copy of the
    first model with the averaged weights.
    """

    name: ClassVar[str] = "uniform_soup"
    paper: ClassVar[str] = "https://arxiv.org/abs/2203.05482"

    def merge(self, base, models: Sequence, weights: Sequence[float] | None = None):
        if weights is not None:
            raise ValueError("UniformSoup does not take weights (use TaskArithmetic for a weighted sum). Got weights.")
        return _average(self._check_models(models), "UniformSoup.merge")

    __call__ = merge

    def merge_vectors(self, vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        vectors, _ = self._check_vectors(vectors, None)
        return sum(vectors) / len(vectors)


@dataclass
class GreedySoupResult:
    """The greedy soup, the indices of its ingredients, and the search history (one row per candidate)."""

    model: object
    ingredients: list[int]
    history: pd.DataFrame
    individual: list[float]

    @property
    def score(self) -> float:
        """The held-out metric of the final soup."""
        return float(self.history["soup_score"].iloc[-1])

    def to_frame(self) -> pd.DataFrame:
        return self.history.copy()

    def plot(self, ax=None):
        """Held-out score of each ingredient alone and of the soup as candidates are tried."""
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3))
        h = self.history
        ax.plot(range(len(h)), h["candidate_score"], "o", label="soup + candidate", color="0.6")
        ax.step(range(len(h)), h["soup_score"], where="post", label="greedy soup", color="C0")
        ax.set_xticks(range(len(h)), [f"#{i}" for i in h["model"]])
        ax.set_xlabel("candidate (by individual score)")
        ax.set_ylabel("held-out score")
        ax.legend(frameon=False)
        fig.tight_layout()
        return fig


@dataclass(frozen=True, repr=False)
class GreedySoup(MergeRule):
    """Greedy soup (Wortsman et al. 2022, arXiv 2203.05482): add ingredients only while held-out score rises.

    Parameters
    ----------
    metric : callable
        ``metric(model) -> float``, higher is better, computed on **held-out** (validation) data, never on
        the test data the soup is reported on.

    Examples
    --------
    >>> import torch
    >>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([9.0])}]
    >>> soup = GreedySoup(metric=lambda m: -abs(float(m["w"]) - 2.0)).search(models)
    >>> soup.ingredients, soup.model["w"].tolist()
    ([0, 1], [2.0])
    """

    metric: Callable = field(default=None)

    name: ClassVar[str] = "greedy_soup"
    paper: ClassVar[str] = "https://arxiv.org/abs/2203.05482"

    def __post_init__(self):
        if not callable(self.metric):
            raise TypeError(f"The 'metric' parameter of GreedySoup must be a callable model -> float. Got {self.metric!r}.")

    def _score(self, model) -> float:
        value = self.metric(model)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
            raise ValueError(
                f"The 'metric' of GreedySoup must return a finite number (higher is better). Got {value!r}: a NaN "
                "score would silently never be 'higher', so the soup would skip ingredients without a word."
            )
        return float(value)

    def search(self, models: Sequence) -> GreedySoupResult:
        """Run the greedy search and return the soup with its history."""
        models = [materialize(m, "GreedySoup") for m in self._check_models(models)]
        for i, m in enumerate(models):
            check_finite(_parameters(m)[0], f"The 'models' parameter of GreedySoup.search: model {i}")
        individual = [self._score(m) for m in models]
        order = sorted(range(len(models)), key=lambda i: -individual[i])
        chosen = [order[0]]
        soup, best = models[order[0]], individual[order[0]]
        rows = [{"model": order[0], "individual_score": best, "candidate_score": best, "added": True, "soup_score": best}]
        for i in order[1:]:
            candidate = _average([models[j] for j in chosen + [i]])
            score = self._score(candidate)
            added = score > best  # strictly higher, as in the paper's code
            if added:
                chosen.append(i)
                soup, best = candidate, score
            rows.append({"model": i, "individual_score": individual[i], "candidate_score": score, "added": added, "soup_score": best})
        if len(chosen) == 1:
            soup = _average([models[chosen[0]]])  # a copy, never the caller's model
        return GreedySoupResult(model=soup, ingredients=chosen, history=pd.DataFrame(rows), individual=individual)

    def merge(self, base, models: Sequence, weights: Sequence[float] | None = None):
        if weights is not None:
            raise ValueError("GreedySoup does not take weights. Got weights.")
        return self.search(models).model

    __call__ = merge
