"""Sparse fine-tuning: a few entries of the base weights train, and the update is a sparse difference.

- :class:`SparseDiff`: a sparse difference between two models (per parameter: flat indices and values) that
  is added to a model, composes with other diffs by addition and is saved as safetensors.
- :class:`LTSFT`: Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022): full fine-tuning, keep the top-K
  ``|theta_1 - theta_0|``, rewind to ``theta_0``, retrain only those K entries.
- :class:`SpIEL`: sparse fine-tuning scaled to LLMs (Ansell et al. 2024): a fixed budget of trainable
  entries, regularly dropping the smallest ``|delta|`` and regrowing where the accumulated gradient is largest.
- :class:`LIFT`: Low-rank Informed sparse Fine-Tuning (Liu et al. 2025): only the "principal weights", the
  largest entries of a rank-r approximation of each matrix, train.

All of them train the base weights in place through boolean masks: the gradient of a frozen entry is zeroed
before the optimiser step, and after the step every frozen entry is written back to the value it is held at
(``theta_0`` for LT-SFT and SpIEL). So momentum, weight decay or a regrown entry never move a frozen entry,
and the final difference is exactly as sparse as the mask (the subtlety the LT-SFT code leaves to
``weight_decay=0``). Masks are dense boolean tensors: this is a reference implementation for analysis, not a
memory-efficient one (SpIEL's real implementation stores only indices and values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._validation import check_float, check_int, check_option
from ..nn.view import MatrixRef, ModelView
from .base import Method
from .targets import resolve_targets

_FORMAT = "ftanalysis.SparseDiff"


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (``numpy.random.SeedSequence``): ``mix_seed(seed, stage)``."""
    entropy = [int(p) % (2**63) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` by name, tied duplicates included (``lm_head.weight`` and the embedding)."""
    return dict(model.named_parameters(remove_duplicate=False))


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every ``nn.Embedding`` weight (and so of an output head tied to one)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def new_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of the parameters the pretrained model did not have (a classifier head)."""
    return {id(p) for p in getattr(model, "new_parameters", lambda: [])()}


# ---------------------------------------------------------------------------------------------- SparseDiff
@dataclass(repr=False)
class SparseDiff:
    """A sparse difference between two models: for each parameter, flat indices and the values added there.

    ``theta = theta_0 + diff`` is :meth:`apply_to`; two diffs compose by addition (:meth:`add`, ``+``), so
    LT-SFT's ``theta_0 + phi_task + phi_lang`` is ``(phi_task + phi_lang).apply_to(model)`` or two
    ``apply_to`` calls in either order.

    Parameters
    ----------
    indices : dict of str -> LongTensor ``[nnz]``
        Flat (row-major) indices into each parameter, keyed by the parameter's name in the model.
    values : dict of str -> FloatTensor ``[nnz]``
        The values added at those indices.
    shapes : dict of str -> tuple of int
        The full shape of each parameter (the diff knows the tensors it covers, zeros included, for
        :attr:`density`).
    """

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]

    def __post_init__(self):
        if not (set(self.indices) == set(self.values) == set(self.shapes)):
            raise ValueError("SparseDiff: 'indices', 'values' and 'shapes' must have the same parameter names.")
        for name in list(self.indices):
            shape = tuple(int(s) for s in self.shapes[name])
            numel = int(np.prod(shape)) if shape else 1
            idx = torch.as_tensor(self.indices[name]).detach().reshape(-1).to(device="cpu", dtype=torch.int64)
            val = torch.as_tensor(self.values[name]).detach().reshape(-1).to(device="cpu", dtype=torch.float32)
            if idx.shape != val.shape:
                raise ValueError(f"SparseDiff[{name!r}]: {idx.numel()} indices but {val.numel()} values.")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"SparseDiff[{name!r}]: indices must lie in [0, {numel}) for shape {shape}.")
            order = torch.argsort(idx)
            idx, val = idx[order], val[order]
            if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
                raise ValueError(f"SparseDiff[{name!r}]: duplicate indices (use SparseDiff.add to sum diffs).")
            self.indices[name], self.values[name], self.shapes[name] = idx, val, shape

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, deltas: dict[str, torch.Tensor], threshold: float = 0.0) -> SparseDiff:
        """Keep the entries of each dense delta with ``|delta| > threshold``."""
        check_float(threshold, "threshold", "SparseDiff.from_dense", low=0.0)
        indices, values, shapes = {}, {}, {}
        for name, delta in deltas.items():
            flat = delta.detach().reshape(-1).float().cpu()
            idx = torch.nonzero(flat.abs() > threshold).reshape(-1)
            indices[name], values[name], shapes[name] = idx, flat[idx], tuple(delta.shape)
        return cls(indices, values, shapes)

    @classmethod
    def between(cls, base: nn.Module, tuned: nn.Module, threshold: float = 0.0, names: list[str] | None = None) -> SparseDiff:
        """The entries where two models of one architecture differ: ``tuned - base``."""
        a, b = named_parameters(base), named_parameters(tuned)
        names = [n for n in b if n in a] if names is None else list(names)
        missing = [n for n in names if n not in a or n not in b]
        if missing:
            raise ValueError(f"SparseDiff.between: parameters {missing[:5]} are not in both models.")
        return cls.from_dense({n: b[n].detach().float() - a[n].detach().float() for n in names}, threshold)

    # ------------------------------------------------------------------ sizes
    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return sum(int(v.numel()) for v in self.values.values())

    @property
    def numel(self) -> int:
        """Number of entries of the parameters the diff covers."""
        return sum(int(np.prod(s)) if s else 1 for s in self.shapes.values())

    @property
    def density(self) -> float:
        """``nnz / numel``: the fraction of the covered parameters' entries that the diff changes."""
        return self.nnz / max(1, self.numel)

    # ------------------------------------------------------------------ algebra
    def to_dense(self, name: str) -> torch.Tensor:
        """The dense delta of one parameter (float32, its full shape)."""
        if name not in self.shapes:
            raise ValueError(f"SparseDiff has no parameter {name!r}. It covers: {sorted(self.shapes)[:8]}.")
        dense = torch.zeros(int(np.prod(self.shapes[name])) if self.shapes[name] else 1)
        dense[self.indices[name]] = self.values[name]
        return dense.reshape(self.shapes[name])

    def add(self, other: SparseDiff) -> SparseDiff:
        """The sum of two diffs (values at shared indices are added)."""
        if not isinstance(other, SparseDiff):
            raise TypeError(f"SparseDiff.add expects a SparseDiff. Got {type(other).__name__}.")
        indices, values, shapes = {}, {}, {}
        for name in list(self.shapes) + [n for n in other.shapes if n not in self.shapes]:
            if name in self.shapes and name in other.shapes and self.shapes[name] != other.shapes[name]:
                raise ValueError(f"SparseDiff.add: {name!r} has shape {self.shapes[name]} in one diff and {other.shapes[name]} in the other.")
            parts = [d for d in (self, other) if name in d.shapes]
            idx = torch.cat([d.indices[name] for d in parts])
            val = torch.cat([d.values[name] for d in parts])
            unique, inverse = torch.unique(idx, return_inverse=True)
            summed = torch.zeros(unique.numel()).index_add_(0, inverse, val)
            indices[name], values[name], shapes[name] = unique, summed, parts[0].shapes[name]
        return SparseDiff(indices, values, shapes)

    def __add__(self, other: SparseDiff) -> SparseDiff:
        return self.add(other)

    def scaled(self, alpha: float) -> SparseDiff:
        """``alpha * diff``."""
        alpha = check_float(alpha, "alpha", "SparseDiff.scaled")
        return SparseDiff(dict(self.indices), {n: v * alpha for n, v in self.values.items()}, dict(self.shapes))

    def overlap(self, other: SparseDiff) -> int:
        """Number of (parameter, index) entries that both diffs change."""
        shared = 0
        for name in set(self.indices) & set(other.indices):
            shared += int(np.intersect1d(self.indices[name].numpy(), other.indices[name].numpy()).size)
        return shared

    # ------------------------------------------------------------------ models
    @torch.no_grad()
    def apply_to(self, model: nn.Module, scale: float = 1.0, copy: bool = False) -> nn.Module:
        """Add ``scale * diff`` to ``model``'s parameters, **in place** unless ``copy=True``; returns the model."""
        import copy as copy_module

        scale = check_float(scale, "scale", "SparseDiff.apply_to")
        if copy:
            model = copy_module.deepcopy(model)
        params = named_parameters(model)
        missing = [n for n in self.shapes if n not in params]
        if missing:
            raise ValueError(f"SparseDiff.apply_to: the model has no parameter {missing[0]!r} (and {len(missing) - 1} more).")
        for name, shape in self.shapes.items():
            p = params[name]
            if tuple(p.shape) != shape:
                raise ValueError(f"SparseDiff.apply_to: {name!r} has shape {tuple(p.shape)} in the model, {shape} in the diff.")
            flat = p.data.view(-1) if p.data.is_contiguous() else p.data.reshape(-1).clone()
            idx = self.indices[name].to(p.device)
            flat.index_add_(0, idx, (self.values[name] * scale).to(device=p.device, dtype=p.dtype))
            if not p.data.is_contiguous():
                p.data.copy_(flat.view(p.shape))
        return model

    def revert(self, model: nn.Module, copy: bool = False) -> nn.Module:
        """Subtract the diff (undo :meth:`apply_to`)."""
        return self.apply_to(model, scale=-1.0, copy=copy)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the diff to one safetensors file (indices and values per parameter, shapes in the metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.shapes:
            tensors[f"{name}::indices"] = self.indices[name].contiguous()
            tensors[f"{name}::values"] = self.values[name].contiguous()
        meta = {"format": _FORMAT, "version": "1", "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()})}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseDiff:
        """Read a diff written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No SparseDiff file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a SparseDiff file (metadata format {meta.get('format')!r}).")
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        tensors = load_file(str(path))
        return cls({n: tensors[f"{n}::indices"] for n in shapes}, {n: tensors[f"{n}::values"] for n in shapes}, shapes)

    def to_frame(self) -> pd.DataFrame:
        """One row per parameter: ``name``, ``shape``, ``nnz``, ``density``, ``abs_mean``."""
        rows = []
        for name, shape in self.shapes.items():
            numel = int(np.prod(shape)) if shape else 1
            v = self.values[name]
            rows.append({"name": name, "shape": shape, "nnz": int(v.numel()), "density": v.numel() / numel,
                         "abs_mean": float(v.abs().mean()) if v.numel() else 0.0})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"SparseDiff(tensors={len(self.shapes)}, nnz={self.nnz}, density={self.density:.4g})"


# ---------------------------------------------------------------------------------------------- mask machinery
@dataclass(frozen=True)
class MaskUnit:
    """A part of one parameter that a mask method ranks on its own: a whole parameter, or a canonical matrix.

    ``view(t)`` returns the unit's entries of a tensor shaped like the parameter, as a view in ``(out, in)``
    orientation for a canonical matrix (so GPT-2's ``Conv1D`` and its fused q/k/v are handled here).
    """

    name: str  # canonical name ("layers.0.attn.q") or the parameter name
    param: str  # the parameter's name in the model
    ref: MatrixRef | None = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.ref is None:
            return t
        v = t.T if self.ref.transposed else t  # Conv1D stores (in, out)
        return v[self.ref.out_slice(v.shape[0])]


def matrix_units(model: nn.Module, target, owner: str) -> list[MaskUnit]:
    """One :class:`MaskUnit` per targeted canonical matrix (``resolve_targets`` rules)."""
    view = ModelView(model)
    params = named_parameters(model)
    units = []
    for name in resolve_targets(view, target, owner=owner):
        ref = view.ref(name)
        if ref.param_name not in params:
            raise ValueError(
                f"{owner}: {name} is not a plain parameter ({ref.param_name} missing: is another method's wrapper "
                "applied?). Merge the other method first."
            )
        units.append(MaskUnit(name, ref.param_name, ref))
    return units


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of its ``k`` largest entries (ties broken by ``torch.topk``)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k).indices] = True
    return mask.view(scores.shape)


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder): the parts sum to ``total``."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    exact = total * sizes_arr / sizes_arr.sum()
    parts = np.minimum(np.floor(exact).astype(np.int64), np.asarray(sizes))
    order = np.argsort(-(exact - parts), kind="stable")
    for i in order:
        if parts.sum() >= total:
            break
        if parts[i] < sizes[i]:
            parts[i] += 1
    return [int(p) for p in parts]


@dataclass(repr=False)
class EntryMaskedMethod(Method):
    """Base of the methods that train base weights through boolean masks (not registered).

    ``masks_[param]`` marks the entries that train; every other entry of that parameter is held at
    ``anchors_[param]`` after each optimiser step. A parameter without a mask trains entirely if it
    requires a gradient. Subclasses fill the masks in ``_apply`` / ``before_step``.
    """

    masks_: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    anchors_: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ loop
    def training_step(self, state, batch: dict, compute_loss: Callable[[dict], torch.Tensor], grad_clip: float | None) -> torch.Tensor:
        """Back-propagation with the gradients of frozen entries zeroed before clipping and the step."""
        loss = compute_loss(batch)
        if not torch.isfinite(loss):
            return loss.detach()
        loss.backward()
        self.observe_gradients(state)
        self.mask_gradients(state.model)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable_parameters(state.model)], grad_clip)
        self.after_backward(state)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        self.hold_frozen(state.model)
        return loss.detach()

    def observe_gradients(self, state) -> None:
        """Called with the dense gradients, before masking (SpIEL accumulates them here)."""

    def sync(self, model: nn.Module) -> None:
        """Move stored masks and anchors to the device and dtype of their parameters (after ``model.to``)."""
        params = named_parameters(model)
        for store in (self.masks_, self.anchors_, *self._extra_stores()):
            for name, t in list(store.items()):
                p = params[name]
                if t.device != p.device:
                    store[name] = t.to(p.device)

    def _extra_stores(self) -> tuple[dict, ...]:
        return ()

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        params = named_parameters(model)
        for name, mask in self.masks_.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask)

    @torch.no_grad()
    def hold_frozen(self, model: nn.Module) -> None:
        """Write every frozen entry back to its anchor value."""
        params = named_parameters(model)
        for name, mask in self.masks_.items():
            p = params[name]
            p.data.copy_(torch.where(mask, p.data, self.anchors_[name]))

    @staticmethod
    @torch.no_grad()
    def reset_optimizer_entries(optimizer, param: torch.Tensor, entries: torch.Tensor) -> None:
        """Zero the optimiser state (Adam moments) of some entries of one parameter."""
        if optimizer is None or param not in optimizer.state:
            return
        for value in optimizer.state[param].values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[entries] = 0

    def trainable_count(self, model: nn.Module) -> int:
        """Entries that train: the masked entries of masked parameters, all entries of the others."""
        count = 0
        seen = set()
        for name, p in named_parameters(model).items():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            count += int(self.masks_[name].sum()) if name in self.masks_ else p.numel()
        return count

    def state_dict(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self.masks_.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.masks_ = dict(state.get("masks", {}))


@dataclass(repr=False)
class SparseFineTuning(EntryMaskedMethod):
    """Base of LT-SFT, SpIEL and LIFT: masks over units of the base weights, ``theta_0`` kept for the diff."""

    units_: list = field(default_factory=list, init=False, repr=False, compare=False)
    theta0_: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _extra_stores(self) -> tuple[dict, ...]:
        return (self.theta0_,)

    def _freeze_all_but(self, model: nn.Module, names: set[str]) -> None:
        params = named_parameters(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            params[name].requires_grad_(True)
        self.theta0_ = {n: params[n].detach().clone() for n in names}

    def _empty_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = named_parameters(model)
        return {u.param: torch.zeros(params[u.param].shape, dtype=torch.bool, device=params[u.param].device) for u in self.units_}

    def diff(self, model: nn.Module) -> SparseDiff:
        """The learned update ``theta - theta_0`` as a :class:`SparseDiff` over the masked parameters.

        Its entries are the current mask plus any entry that differs from ``theta_0`` (entries that trained
        under an earlier mask and kept their value, as after a LIFT mask refresh).
        """
        if not self.masks_:
            raise ValueError(f"{type(self).__name__}.diff: no mask yet (apply the method and train it first).")
        params = named_parameters(model)
        indices, values, shapes = {}, {}, {}
        for name in self.masks_:
            p = params[name].detach()
            delta = (p.float() - self.theta0_[name].to(p.device).float()).reshape(-1)
            keep = self.masks_[name].to(p.device).reshape(-1) | (delta != 0)
            idx = torch.nonzero(keep).reshape(-1)
            indices[name], values[name], shapes[name] = idx.cpu(), delta[idx].cpu(), tuple(p.shape)
        return SparseDiff(indices, values, shapes)

    def _merge(self, model: nn.Module) -> None:
        """Nothing to fold: the base weights trained in place (the merged model is a copy)."""


def check_budget(owner: str, density, count, default: float) -> tuple[float | None, int | None]:
    """Validate the (density, count) pair of a sparse method: one of them, density in (0, 1]."""
    if density is not None and count is not None:
        raise ValueError(f"{owner} takes either 'density' or 'count', not both. Got density={density!r}, count={count!r}.")
    if count is not None:
        return None, check_int(count, "count", owner, 1)
    density = default if density is None else density
    return check_float(density, "density", owner, low=0.0, high=1.0, low_open=True), None


# ---------------------------------------------------------------------------------------------- LT-SFT
@dataclass(repr=False)
class LTSFT(SparseFineTuning):
    """Lottery-Ticket Sparse Fine-Tuning: full fine-tuning picks K entries, which retrain from ``theta_0``.

    Ansell, Ponti, Korhonen, Vulic 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer"
    (ACL 2022, arXiv 2110.07560)::

        phase 1  (steps 0 .. phase1_steps-1):  theta_1 = full fine-tuning of theta_0
        select   mask = top-K of |theta_1 - theta_0|             (global ranking by default)
        rewind   theta <- theta_0;  reset the optimiser
        phase 2  (remaining steps):  train with grad *= mask;   phi = theta - theta_0 (K entries)

    The result is a :class:`SparseDiff` (:meth:`diff`) that adds to any model of the architecture.

    Parameters
    ----------
    density : float, optional
        K as a fraction of the maskable entries, in (0, 1]. Default 0.01 when ``count`` is not given (the
        code's ``ft_params_proportion``).
    count : int, optional
        K as a number of entries (the code's ``ft_params_num``); exclusive with ``density``.
    phase1_steps : int, optional
        Steps of full fine-tuning; the remaining ``steps - phase1_steps`` of :func:`ftanalysis.finetune` retrain
        the sparse entries. Default: half of the run's steps.
    scope : {"global", "tensor"}, default="global"
        Rank ``|delta|`` over all maskable entries (the code), or keep the same fraction in every tensor.
    exclude_embeddings : bool, default=True
        Embedding matrices (and an output head tied to them) stay frozen in both phases (the code's
        ``freeze_embeddings``). Every other parameter of the pretrained model is maskable; a new classifier
        head trains fully in both phases and is not part of the diff (the code's "abs" parameters).

    Notes
    -----
    One iteration (the code's default ``n_ft_iterations=1``); no L1 regulariser. Frozen entries are held at
    ``theta_0`` after each step, so the diff has exactly K entries whatever the weight decay.
    """

    density: float | None = None
    count: int | None = None
    phase1_steps: int | None = None
    scope: str = "global"
    exclude_embeddings: bool = True
    phase_: int = field(default=1, init=False, repr=False, compare=False)

    name: ClassVar[str] = "lt-sft"
    paper: ClassVar[str] = "https://arxiv.org/abs/2110.07560"

    def __post_init__(self):
        owner = type(self).__name__
        self.density, self.count = check_budget(owner, self.density, self.count, default=0.01)
        if self.phase1_steps is not None:
            check_int(self.phase1_steps, "phase1_steps", owner, 1)
        check_option(self.scope, "scope", owner, ("global", "tensor"))
        check_option(self.exclude_embeddings, "exclude_embeddings", owner, (True, False))

    def _apply(self, model: nn.Module) -> None:
        new_ids = new_parameter_ids(model)
        excluded = embedding_parameter_ids(model) if self.exclude_embeddings else set()
        params = dict(model.named_parameters())  # tied duplicates once
        self.units_ = [MaskUnit(n, n) for n, p in params.items() if id(p) not in new_ids and id(p) not in excluded]
        if not self.units_:
            raise ValueError("LTSFT found no maskable parameter in this model.")
        self._freeze_all_but(model, {u.param for u in self.units_})
        for n, p in params.items():  # the new head is rewound too
            if id(p) in new_ids:
                self.theta0_[n] = p.detach().clone()
        self.masks_, self.anchors_, self.phase_ = {}, {}, 1

    def n_selected(self) -> int:
        """K for this model (after apply)."""
        total = sum(int(self.theta0_[u.param].numel()) for u in self.units_)
        if self.count is not None:
            if self.count > total:
                raise ValueError(f"The 'count' parameter of LTSFT must be <= the {total} maskable entries. Got {self.count}.")
            return self.count
        return max(1, int(round(self.density * total)))

    def trainable_count(self, model: nn.Module) -> int:
        """K (the entries of the final diff) plus a new head's entries (phase 1 trains more, and is undone)."""
        return self.n_selected() + sum(p.numel() for p in getattr(model, "new_parameters", lambda: [])())

    def before_step(self, state) -> None:
        self.sync(state.model)
        if self.phase_ == 2:
            return
        phase1 = self.phase1_steps if self.phase1_steps is not None else state.steps // 2
        if not 1 <= phase1 < state.steps:
            raise ValueError(
                f"LTSFT needs 1 <= phase1_steps < steps to leave steps for phase 2. Got phase1_steps={phase1}, "
                f"steps={state.steps}."
            )
        if state.step >= phase1:
            self.select_and_rewind(state.model, state.optimizer)

    @torch.no_grad()
    def select_and_rewind(self, model: nn.Module, optimizer=None) -> None:
        """End of phase 1: keep the top-K ``|theta - theta_0|``, rewind every trained tensor, reset the optimiser."""
        params = named_parameters(model)
        k = self.n_selected()
        deltas = {u.param: (params[u.param].detach() - self.theta0_[u.param]).abs().float() for u in self.units_}
        masks = {}
        if self.scope == "global":
            flat = torch.cat([d.reshape(-1) for d in deltas.values()])
            chosen = top_k_mask(flat, k)
            start = 0
            for name, d in deltas.items():
                masks[name] = chosen[start : start + d.numel()].view(d.shape).clone()
                start += d.numel()
        else:
            sizes = [d.numel() for d in deltas.values()]
            for (name, d), k_t in zip(deltas.items(), apportion(k, sizes)):
                masks[name] = top_k_mask(d, k_t)
        for name, theta0 in self.theta0_.items():
            params[name].data.copy_(theta0)
        if optimizer is not None:
            optimizer.state.clear()  # a fresh optimiser for phase 2
        self.masks_, self.anchors_, self.phase_ = masks, self.theta0_, 2

    def state_dict(self) -> dict:
        return {**super().state_dict(), "phase": self.phase_}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.phase_ = int(state.get("phase", 1))
        self.anchors_ = self.theta0_ if self.phase_ == 2 else {}


# ---------------------------------------------------------------------------------------------- SpIEL
@dataclass(repr=False)
class SpIEL(SparseFineTuning):
    """Sparse fine-tuning with a fixed budget whose entries are dropped and regrown during training.

    Ansell, Vulic, Sterz, Korhonen, Ponti 2024, "Scaling Sparse Fine-Tuning to Large Language Models"
    (arXiv 2401.16405), the accumulated-gradient ("AG"/"rigl") variant::

        W = W_0 + scatter(I, Delta)            |I| = density * numel per targeted matrix, Delta trains
        every R = update_every steps:
            g = sum of the dense gradients over the A = accumulate_steps steps before the update
            p = drop_fraction * (1 - t / T)                      (linear decay to 0)
            drop the p|I| active entries with the smallest |Delta|   (they return to W_0)
            grow as many inactive entries with the largest |g|       (starting at Delta = 0)

    Parameters
    ----------
    density : float, optional
        Budget per matrix as a fraction of its entries, in (0, 1]; default 0.01 (the code's default).
    count : int, optional
        Total budget in entries, split over the matrices in proportion to their size; exclusive with density.
    target : str or list of str, default="all-linear"
        The matrices with a sparse delta (``resolve_targets`` rules); everything else is frozen.
    update_every : int, default=20
        R, steps between reselections (the README's value; the code's ``args.py`` says 100).
    drop_fraction : float, default=0.2
        Initial fraction of each budget dropped and regrown (the code's ``initial_reselection_rate``), in [0, 1];
        0 keeps the initial mask.
    accumulate_steps : int, default=5
        A, steps of gradient accumulated before each reselection (``selection_accumulation_steps``).
    seed : int, default=0
        Seed of the initial random mask.

    Notes
    -----
    Departures from the code: the first mask is random (the code regrows the whole budget by gradient at the
    first selection), the accumulated gradient is dense (the code keeps only the top candidates), and the
    Adam moments of regrown entries start at zero (the code seeds them from the accumulated statistics).
    :attr:`history_` records the churn of every reselection.
    """

    density: float | None = None
    count: int | None = None
    target: str | list[str] = "all-linear"
    update_every: int = 20
    drop_fraction: float = 0.2
    accumulate_steps: int = 5
    seed: int = 0
    history_: list = field(default_factory=list, init=False, repr=False, compare=False)
    grad_sum_: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    name: ClassVar[str] = "spiel"
    paper: ClassVar[str] = "https://arxiv.org/abs/2401.16405"

    def __post_init__(self):
        owner = type(self).__name__
        self.density, self.count = check_budget(owner, self.density, self.count, default=0.01)
        check_int(self.update_every, "update_every", owner, 1)
        check_float(self.drop_fraction, "drop_fraction", owner, low=0.0, high=1.0)
        check_int(self.accumulate_steps, "accumulate_steps", owner, 1, self.update_every)
        check_int(self.seed, "seed", owner)
        if isinstance(self.target, tuple):
            self.target = list(self.target)

    def _extra_stores(self) -> tuple[dict, ...]:
        return (self.theta0_, self.grad_sum_)

    def _apply(self, model: nn.Module) -> None:
        self.units_ = matrix_units(model, self.target, type(self).__name__)
        self._freeze_all_but(model, {u.param for u in self.units_})
        sizes = [u.view(self.theta0_[u.param]).numel() for u in self.units_]
        budgets = apportion(self.count, sizes) if self.count is not None else [max(1, int(round(self.density * s))) for s in sizes]
        if self.count is not None and self.count > sum(sizes):
            raise ValueError(f"The 'count' parameter of SpIEL must be <= the {sum(sizes)} targeted entries. Got {self.count}.")
        generator = torch.Generator().manual_seed(self.seed)
        masks = self._empty_masks(model)
        for unit, size, k in zip(self.units_, sizes, budgets):
            chosen = torch.zeros(size, dtype=torch.bool)
            chosen[torch.randperm(size, generator=generator)[:k]] = True
            view = unit.view(masks[unit.param])
            view.copy_(chosen.view(view.shape))
        self.masks_, self.anchors_ = masks, self.theta0_
        self.history_, self.grad_sum_ = [], {}

    def budget(self) -> dict[str, int]:
        """Active entries per targeted matrix (constant through training)."""
        return {u.name: int(u.view(self.masks_[u.param]).sum()) for u in self.units_}

    def _accumulating(self, step: int, steps: int) -> bool:
        upcoming = (step // self.update_every + 1) * self.update_every
        return upcoming < steps and step >= upcoming - self.accumulate_steps

    @torch.no_grad()
    def observe_gradients(self, state) -> None:
        if not self.drop_fraction or not self._accumulating(state.step, state.steps):
            return
        params = named_parameters(state.model)
        for name in self.masks_:
            grad = params[name].grad
            if grad is None:
                continue
            if name in self.grad_sum_:
                self.grad_sum_[name] += grad.float()
            else:
                self.grad_sum_[name] = grad.detach().float().clone()

    def before_step(self, state) -> None:
        self.sync(state.model)
        if state.step > 0 and state.step % self.update_every == 0 and self.grad_sum_:
            self.reselect(state.model, state.optimizer, state.step, state.steps)

    @torch.no_grad()
    def reselect(self, model: nn.Module, optimizer, step: int, steps: int) -> None:
        """Drop the smallest ``|delta|``, regrow by the largest accumulated ``|gradient|`` (same number)."""
        params = named_parameters(model)
        fraction = self.drop_fraction * (1 - step / steps)
        changed_total, active_total = 0, 0
        for unit in self.units_:
            name = unit.param
            mask = unit.view(self.masks_[name])
            flat_mask = mask.reshape(-1).clone()
            k = int(flat_mask.sum())
            active_total += k
            n = min(int(round(fraction * k)), flat_mask.numel() - k)
            if n <= 0 or name not in self.grad_sum_:
                continue
            delta = (unit.view(params[name].detach()) - unit.view(self.theta0_[name])).abs().reshape(-1).float()
            active = torch.nonzero(flat_mask).reshape(-1)
            dropped = active[torch.topk(delta[active], n, largest=False).indices]
            score = unit.view(self.grad_sum_[name]).abs().reshape(-1).clone()
            score[flat_mask] = -1.0  # only entries inactive before the drop may grow
            grown = torch.topk(score, n).indices
            flat_mask[dropped] = False
            flat_mask[grown] = True
            mask.copy_(flat_mask.view(mask.shape))
            changed = torch.zeros_like(flat_mask)
            changed[dropped] = True
            changed[grown] = True
            entries = torch.zeros_like(self.masks_[name])
            unit.view(entries).copy_(changed.view(mask.shape))
            self.reset_optimizer_entries(optimizer, params[name], entries)
            changed_total += n
        self.hold_frozen(model)  # dropped entries return to theta_0
        self.grad_sum_ = {}
        self.history_.append({"step": step, "drop_fraction": fraction, "changed": changed_total, "active": active_total})

    def history(self) -> pd.DataFrame:
        """One row per reselection: ``step``, ``drop_fraction``, ``changed`` (entries regrown), ``active``."""
        return pd.DataFrame(self.history_, columns=["step", "drop_fraction", "changed", "active"])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "grad_sum": {n: g.cpu() for n, g in self.grad_sum_.items()}, "history": list(self.history_)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.grad_sum_ = dict(state.get("grad_sum", {}))
        self.history_ = list(state.get("history", []))


# ---------------------------------------------------------------------------------------------- LIFT
def principal_mask(W: torch.Tensor, rank: int, k: int) -> torch.Tensor:
    """LIFT's principal weights: the ``k`` largest ``|entries|`` of the rank-``rank`` SVD approximation of ``W``.

    ``W_r = U[:, :r] diag(S[:r]) V[:, :r]^T``; returns a boolean ``(out, in)`` mask with exactly ``k`` entries.
    """
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    approx = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # (out, in)
    return top_k_mask(approx.abs(), k)


@dataclass(repr=False)
class LIFT(SparseFineTuning):
    """Low-rank Informed sparse Fine-Tuning: train only the principal weights of each matrix.

    Liu, Pang, Balabanov, Yang, Huang, Yin, Yang, Liu 2025, "LIFT the Veil for the Truth: Principal Weights
    Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning" (arXiv 2506.00772)::

        W_r  = rank-r SVD approximation of W           (r = rank, the code's filter_rank)
        mask = top-K entries of |W_r|                   (K = density * numel, the paper's top 5%)
        train W with grad *= mask;  every update_every steps recompute the mask from the current W

    Parameters
    ----------
    rank : int, default=8
        r, rank of the approximation; in [1, min(out, in)] of every targeted matrix. The paper's LLM runs use
        32-128 for d = 2048-4096; the default suits the zoo's d = 64.
    density : float, optional
        K per matrix as a fraction of its entries, in (0, 1]; default 0.05.
    lora_rank : int, optional
        K per matrix matched to a LoRA of this rank, ``min((out + in) * lora_rank, out * in)`` (the official
        code's budget); exclusive with density.
    target : str or list of str, default="all-linear"
        The matrices that may train; everything else is frozen (a new classifier head trains).
    update_every : int, optional
        Recompute the masks every this many steps (the code's ``update_interval``, e.g. 400). Entries that
        leave the mask keep their trained value; entries that join start with zero Adam moments (as in the
        code). Default: one mask for the whole run.
    """

    rank: int = 8
    density: float | None = None
    lora_rank: int | None = None
    target: str | list[str] = "all-linear"
    update_every: int | None = None
    refreshes_: int = field(default=0, init=False, repr=False, compare=False)

    name: ClassVar[str] = "lift"
    paper: ClassVar[str] = "https://arxiv.org/abs/2506.00772"

    def __post_init__(self):
        owner = type(self).__name__
        check_int(self.rank, "rank", owner, 1)
        if self.density is not None and self.lora_rank is not None:
            raise ValueError(f"LIFT takes either 'density' or 'lora_rank', not both. Got {self.density!r}, {self.lora_rank!r}.")
        if self.lora_rank is not None:
            check_int(self.lora_rank, "lora_rank", owner, 1)
        else:
            self.density = check_float(0.05 if self.density is None else self.density, "density", owner, low=0.0, high=1.0, low_open=True)
        if self.update_every is not None:
            check_int(self.update_every, "update_every", owner, 1)
        if isinstance(self.target, tuple):
            self.target = list(self.target)

    def budget_for(self, out: int, inp: int) -> int:
        """K for an ``(out, in)`` matrix."""
        if self.lora_rank is not None:
            return min((out + inp) * self.lora_rank, out * inp)
        return max(1, int(round(self.density * out * inp)))

    def _apply(self, model: nn.Module) -> None:
        self.units_ = matrix_units(model, self.target, type(self).__name__)
        for unit in self.units_:
            out, inp = unit.ref.to_canonical(named_parameters(model)[unit.param]).shape
            if self.rank > min(out, inp):
                raise ValueError(
                    f"The 'rank' parameter of LIFT must be <= min(out, in) = {min(out, inp)} for {unit.name} of shape "
                    f"({out}, {inp}). Got {self.rank}."
                )
        self._freeze_all_but(model, {u.param for u in self.units_})
        self.masks_ = self.compute_masks(model)
        self.anchors_ = {n: t.clone() for n, t in self.theta0_.items()} if self.update_every else self.theta0_
        self.refreshes_ = 0

    @torch.no_grad()
    def compute_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Principal-weight masks of the current weights, per parameter."""
        params = named_parameters(model)
        masks = self._empty_masks(model)
        for unit in self.units_:
            W = unit.view(params[unit.param].detach())
            unit.view(masks[unit.param]).copy_(principal_mask(W, self.rank, self.budget_for(*W.shape)))
        return masks

    def before_step(self, state) -> None:
        self.sync(state.model)
        if self.update_every and state.step > 0 and state.step % self.update_every == 0:
            self.refresh(state.model, state.optimizer)

    @torch.no_grad()
    def refresh(self, model: nn.Module, optimizer=None) -> None:
        """Recompute the masks from the current weights; leaving entries keep their values."""
        params = named_parameters(model)
        new = self.compute_masks(model)
        for name, mask in new.items():
            self.reset_optimizer_entries(optimizer, params[name], mask & ~self.masks_[name])
            self.anchors_[name] = params[name].detach().clone()
        self.masks_ = new
        self.refreshes_ += 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.update_every:
            state["anchors"] = {n: a.cpu() for n, a in self.anchors_.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "anchors" in state:
            self.anchors_ = dict(state["anchors"])
