"""Subspace training and the intrinsic dimension of fine-tuning.

Li, Farkhoor, Liu, Yosinski 2018, "Measuring the Intrinsic Dimension of Objective Landscapes"
(arXiv 1804.08838) and Aghajanyan, Zettlemoyer, Gupta 2021, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning" (ACL 2021, arXiv 2012.13255)::

    DID:   theta_i = theta0_i + P_i theta_d                 theta_d in R^d, zero at init, the only trained vector
    SAID:  theta_i = theta0_i + lambda_i P_i theta_(d-m)     one trained scalar lambda_i per tensor (m tensors)
    d90  = the smallest d whose fine-tuned metric reaches 90% of full fine-tuning's

``P_i`` is a fixed random projection ``R^d -> R^(D_i)`` per parameter tensor (``D_i`` its size), as in the
paper's code: a Fastfood transform (``O(D log D)`` time, ``O(D)`` memory) or, for small models, a dense
seeded Gaussian matrix. Both have columns of unit expected norm (entries of variance ``1 / D_i``).

The projection is a ``torch.nn.utils.parametrize`` parametrisation of every projected parameter (tied weights
share one), so the model stays an ordinary module that :func:`ftanalysis.finetune` trains; ``merge`` writes
``theta0 + P theta_d`` into plain parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._validation import check_float, check_int, check_option
from .base import Method
from .sparse import embedding_parameter_ids, mix_seed, new_parameter_ids

HOLDER = "fta_subspace"
PROJECTIONS = ("fastfood", "dense")


# ---------------------------------------------------------------------------------------------- transforms
def fwht(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard transform over the last axis (length a power of 2), unnormalised: ``x @ H``.

    ``H`` is the Sylvester-ordered Hadamard matrix, ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``
    (symmetric, ``H H = n I``); ``O(n log n)`` with one butterfly per level, differentiable.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a last axis whose length is a power of 2. Got {n}.")
    batch = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*batch, n // (2 * h), 2, h)  # [..., block, pair, h]
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


class FastfoodProjection(nn.Module):
    """Fastfood projection ``R^d -> R^D``: ``P x = (H G Pi H B pad(x))[:D] / (||G|| sqrt(L) sqrt(D / L))``.

    Le, Sarlos, Smola 2013 (Fastfood), as used by Li et al. 2018 and Aghajanyan et al. 2021: ``L`` is the next
    power of 2 >= max(d, D), ``B`` random signs, ``Pi`` a random permutation, ``G`` Gaussian, ``H`` the
    Walsh-Hadamard matrix. With this normalisation every column of ``P`` has unit expected norm.

    Parameters
    ----------
    d, D : int
        Input and output dimensions.
    seed : int
        Seed of ``B``, ``Pi`` and ``G``.
    """

    def __init__(self, d: int, D: int, seed: int):
        super().__init__()
        self.d, self.D = d, D
        self.L = 1 << max(0, math.ceil(math.log2(max(d, D, 1))))
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randint(0, 2, (self.L,), generator=generator).float() * 2 - 1)
        self.register_buffer("Pi", torch.randperm(self.L, generator=generator))
        self.register_buffer("G", torch.randn(self.L, generator=generator))
        self.register_buffer("scale", (self.G.norm() * math.sqrt(self.L) * math.sqrt(D / self.L)).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [d] -> [D]
        v = F.pad(x.float(), (0, self.L - self.d))  # [L]
        v = fwht(self.B * v)[self.Pi] * self.G
        return fwht(v)[: self.D] / self.scale

    def matrix(self) -> torch.Tensor:
        """The explicit ``(D, d)`` matrix (for tests and small cases)."""
        return self.forward_batch(torch.eye(self.d)).T

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, D]
        v = F.pad(x.float(), (0, self.L - self.d))
        v = fwht(self.B * v)[:, self.Pi] * self.G
        return fwht(v)[:, : self.D] / self.scale


class DenseProjection(nn.Module):
    """Dense Gaussian projection ``R^d -> R^D`` with entries ``N(0, 1 / D)`` (unit expected column norm)."""

    def __init__(self, d: int, D: int, seed: int):
        super().__init__()
        self.d, self.D = d, D
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("P", torch.randn(D, d, generator=generator) / math.sqrt(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.P @ x.float()

    def matrix(self) -> torch.Tensor:
        return self.P.clone()


def make_projection(kind: str, d: int, D: int, seed: int) -> nn.Module:
    """A Fastfood or dense projection ``R^d -> R^D``."""
    check_option(kind, "projection", "make_projection", PROJECTIONS)
    return FastfoodProjection(d, D, seed) if kind == "fastfood" else DenseProjection(d, D, seed)


class SubspaceParameters(nn.Module):
    """The trained vector ``theta_d`` (and SAID's ``lambda``), held once by the model as ``fta_subspace``."""

    def __init__(self, d: int, n_tensors: int, said: bool):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        self.lambdas = nn.Parameter(torch.ones(n_tensors)) if said else None  # the code's init 1


class SubspaceDelta(nn.Module):
    """Parametrisation ``W -> W + lambda_i * reshape(P_i theta_d)`` of one parameter tensor."""

    def __init__(self, holder: SubspaceParameters, projection: nn.Module, index: int, shape: torch.Size):
        super().__init__()
        self.projection = projection
        self.index = index
        self.shape = tuple(shape)
        self._holder = [holder]  # a reference, not a submodule: the model registers the holder once

    def delta(self) -> torch.Tensor:
        holder = self._holder[0]
        out = self.projection(holder.theta).view(self.shape)
        if holder.lambdas is not None:
            out = holder.lambdas[self.index] * out
        return out

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta().to(W.dtype)


# ---------------------------------------------------------------------------------------------- methods
@dataclass(repr=False)
class Subspace(Method):
    """Train in a random ``d``-dimensional subspace: ``theta = theta_0 + P theta_d`` (DID).

    See the module docstring for the papers and formulas.

    Parameters
    ----------
    d : int, default=200
        Subspace dimension (the paper's headline: 200 parameters give 90% of full fine-tuning on MRPC with
        RoBERTa-large; tiny models need a sweep, see :func:`intrinsic_dimension_sweep`).
    projection : {"fastfood", "dense"}, default="fastfood"
        ``dense`` stores ``D x d`` floats: it is refused above ``max_dense_entries``.
    seed : int, default=0
        Seed of the projections (tensor ``i`` uses ``mix_seed(seed, i)``).
    exclude_embeddings : bool, default=False
        Keep embedding matrices (and a head tied to them) out of the projection, frozen.
    max_dense_entries : int, default=2**27
        Largest ``d * D`` accepted with ``projection="dense"``.

    Notes
    -----
    Every parameter of the pretrained model is projected (the paper's ``prod(shape)`` line, not the
    ``sum(shape)`` rank-1 shortcut left active in a later copy of the code); a new classifier head is trained
    directly. The Fastfood ``L`` is the next power of 2 >= max(d, D_i) (the code pads to D_i only, which
    silently truncates theta_d when d > D_i).
    """

    d: int = 200
    projection: str = "fastfood"
    seed: int = 0
    exclude_embeddings: bool = False
    max_dense_entries: int = 2**27
    projected_: list = field(default_factory=list, init=False, repr=False, compare=False)

    name: ClassVar[str] = "subspace"
    paper: ClassVar[str] = "https://arxiv.org/abs/2012.13255"
    said: ClassVar[bool] = False

    def __post_init__(self):
        owner = type(self).__name__
        check_int(self.d, "d", owner, 1)
        check_option(self.projection, "projection", owner, PROJECTIONS)
        check_int(self.seed, "seed", owner)
        check_option(self.exclude_embeddings, "exclude_embeddings", owner, (True, False))
        check_int(self.max_dense_entries, "max_dense_entries", owner, 1)

    def theta_dim(self, n_tensors: int) -> int:
        """Length of ``theta_d`` (``d``; SAID: ``d - m``)."""
        return self.d

    def _apply(self, model: nn.Module) -> None:
        if hasattr(model, HOLDER):
            raise ValueError(f"This model already carries a {type(self).__name__} subspace: merge it first.")
        new_ids = new_parameter_ids(model)
        excluded = embedding_parameter_ids(model) if self.exclude_embeddings else set()
        unique = [(n, p) for n, p in model.named_parameters() if id(p) not in new_ids and id(p) not in excluded]
        if not unique:
            raise ValueError(f"{type(self).__name__} found no parameter to project in this model.")
        dim = self.theta_dim(len(unique))
        total = sum(p.numel() for _, p in unique)
        if self.projection == "dense" and dim * total > self.max_dense_entries:
            raise ValueError(
                f"{type(self).__name__}(projection='dense') would store d * D = {dim} * {total} = {dim * total} floats, above "
                f"max_dense_entries={self.max_dense_entries}. Use projection='fastfood' for a model of this size."
            )
        for p in model.parameters():
            p.requires_grad_(False)
        holder = SubspaceParameters(dim, len(unique), self.said)
        model.add_module(HOLDER, holder)
        locations: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                locations.setdefault(id(p), []).append((module, pname))
        self.projected_ = []
        for index, (name, p) in enumerate(unique):
            delta = SubspaceDelta(holder, make_projection(self.projection, dim, p.numel(), mix_seed(self.seed, index)), index, p.shape)
            for module, pname in locations[id(p)]:  # a tied weight gets the same parametrisation everywhere
                parametrize.register_parametrization(module, pname, delta)
            self.projected_.append(name)

    def _merge(self, model: nn.Module) -> None:
        if not hasattr(model, HOLDER):
            raise ValueError(f"{type(self).__name__}.merge: the model carries no subspace (was apply called?).")
        merged = []
        with torch.no_grad():
            for module in list(model.modules()):
                if parametrize.is_parametrized(module):
                    for pname in list(module.parametrizations.keys()):
                        merged.append((module, pname, getattr(module, pname).detach().clone()))
            for module in {id(m): m for m, _, _ in merged}.values():
                # a deep copy shares its parametrised class with the original, and removal deletes the class's
                # property: give this module a class of its own first, or merging a copy breaks the original
                cls = module.__class__
                own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
                module.__class__ = type(cls.__name__, cls.__bases__, own)
            for module, pname, _ in merged:
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)  # the original Parameter, ties kept
            for module, pname, value in merged:
                getattr(module, pname).data.copy_(value)
        delattr(model, HOLDER)

    def subspace_parameters(self, model: nn.Module) -> SubspaceParameters:
        """The model's ``theta_d`` holder."""
        if not hasattr(model, HOLDER):
            raise ValueError(f"{type(self).__name__}: the model carries no subspace (was apply called?).")
        return getattr(model, HOLDER)


@dataclass(repr=False)
class SAID(Subspace):
    """Structure-aware intrinsic dimension: ``theta_i = theta0_i + lambda_i P_i theta_(d - m)``.

    Aghajanyan, Zettlemoyer, Gupta 2021 (arXiv 2012.13255): one trained scalar per projected tensor
    (``m`` of them, initialised to 1 as in the code) spends ``m`` of the ``d`` trained numbers; ``d`` must
    exceed ``m``. Parameters as :class:`Subspace`.
    """

    name: ClassVar[str] = "said"
    said: ClassVar[bool] = True

    def theta_dim(self, n_tensors: int) -> int:
        if self.d <= n_tensors:
            raise ValueError(
                f"The 'd' parameter of SAID must exceed the number of projected tensors m = {n_tensors} "
                f"(theta has d - m entries). Got {self.d}."
            )
        return self.d - n_tensors


# ---------------------------------------------------------------------------------------------- d90 sweep
def d_threshold(dims, metrics, full_metric: float, threshold: float = 0.9) -> int | None:
    """Smallest ``d`` whose metric reaches ``threshold * full_metric`` (None if none does)."""
    reached = [d for d, m in sorted(zip(dims, metrics)) if m >= threshold * full_metric]
    return int(reached[0]) if reached else None


@dataclass
class IntrinsicDimensionResult:
    """Outcome of :func:`intrinsic_dimension_sweep`.

    Attributes
    ----------
    dims, metrics : list
        Subspace dimensions and the fine-tuned metric at each.
    full_metric, base_metric : float
        Full fine-tuning's metric and the untuned model's.
    metric : str
        The key of ``task.evaluate`` that was compared.
    threshold : float
        0.9 for d90.
    d90 : int or None
        Smallest d reaching ``threshold * full_metric`` (None if no d does).
    """

    dims: list
    metrics: list
    full_metric: float
    base_metric: float
    metric: str
    threshold: float
    d90: int | None
    method: str

    def to_frame(self) -> pd.DataFrame:
        """One row per d: ``d``, the metric, ``fraction_of_full``, ``reached``; ``attrs`` hold d90 and the references."""
        frame = pd.DataFrame({"d": self.dims, self.metric: self.metrics})
        frame["fraction_of_full"] = frame[self.metric] / self.full_metric if self.full_metric else np.nan
        frame["reached"] = frame[self.metric] >= self.threshold * self.full_metric
        frame.attrs.update({"d90": self.d90, "full_metric": self.full_metric, "base_metric": self.base_metric, "threshold": self.threshold})
        return frame

    def plot(self, ax=None) -> plt.Figure:
        """Metric against d (log axis) with the full fine-tuning, threshold and base levels."""
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.2))
        ax.plot(self.dims, self.metrics, "o-", label=self.method)
        ax.axhline(self.full_metric, color="k", lw=1, label="full fine-tuning")
        ax.axhline(self.threshold * self.full_metric, color="k", ls="--", lw=1, label=f"{self.threshold:.0%} of full")
        ax.axhline(self.base_metric, color="grey", ls=":", lw=1, label="base")
        if self.d90 is not None:
            ax.axvline(self.d90, color="C3", ls=":", lw=1, label=f"d{int(self.threshold * 100)} = {self.d90}")
        ax.set_xscale("log")
        ax.set_xlabel("subspace dimension d")
        ax.set_ylabel(self.metric)
        ax.legend(fontsize=7)
        return fig


def intrinsic_dimension_sweep(
    model: nn.Module,
    tok,
    task,
    dims,
    *,
    said: bool = False,
    projection: str = "fastfood",
    steps: int = 200,
    lr: float = 1e-2,
    full_steps: int | None = None,
    full_lr: float = 1e-3,
    full_metric: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    metric: str = "accuracy",
    eval_n: int = 256,
    threshold: float = 0.9,
    device=None,
    progress: bool = True,
) -> IntrinsicDimensionResult:
    """Fine-tune ``model`` in a subspace of each dimension in ``dims`` and report d90.

    Parameters
    ----------
    model, tok, task : the base model, its tokenizer and an ``fta.tasks`` task (never modified).
    dims : iterable of int
        Subspace dimensions to try.
    said : bool, default=False
        Use :class:`SAID` instead of :class:`Subspace` (DID).
    projection : {"fastfood", "dense"}
    steps, lr : subspace fine-tuning length and learning rate (subspace training wants a large lr).
    full_steps, full_lr : the full fine-tuning reference (default ``full_steps = steps``).
    full_metric : float, optional
        A known full fine-tuning metric; skips the reference run.
    batch_size, seed, device : passed to :func:`ftanalysis.finetune`.
    metric : str, default="accuracy"
        The key of ``task.evaluate`` compared (higher is better).
    eval_n : int, default=256
        Test examples per evaluation.
    threshold : float, default=0.9
        0.9 gives d90.

    Returns
    -------
    IntrinsicDimensionResult
        ``.to_frame()`` is the table (one row per d, d90 in ``attrs``), ``.plot()`` the curve.
    """
    from ..train import finetune
    from .full import Full

    dims = [check_int(d, "dims", "intrinsic_dimension_sweep", 1) for d in dims]
    if not dims:
        raise ValueError("The 'dims' parameter of intrinsic_dimension_sweep must list at least one dimension.")
    threshold = check_float(threshold, "threshold", "intrinsic_dimension_sweep", low=0.0, high=1.0, low_open=True)

    def score(m: nn.Module) -> float:
        scores = task.evaluate(m, tok, split="test", n=eval_n)
        if metric not in scores:
            raise ValueError(f"The 'metric' parameter of intrinsic_dimension_sweep must be one of {sorted(scores)}. Got {metric!r}.")
        return float(scores[metric])

    base_metric = score(model)
    if full_metric is None:
        full = finetune(model, tok, task, Full(), steps=full_steps or steps, lr=full_lr, batch_size=batch_size, seed=seed, device=device, progress=progress)
        full_metric = score(full.model)
    cls = SAID if said else Subspace
    metrics = []
    for d in dims:
        result = finetune(model, tok, task, cls(d=d, projection=projection, seed=seed), steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device, progress=progress)
        metrics.append(score(result.model))
    return IntrinsicDimensionResult(
        dims=dims, metrics=metrics, full_metric=float(full_metric), base_metric=base_metric, metric=metric,
        threshold=threshold, d90=d_threshold(dims, metrics, full_metric, threshold), method=cls.__name__,
    )
