"""Task vectors: the fine-tuning update ``tau = theta_ft - theta_base`` as an object that adds, scales and applies.

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR 2023, arXiv 2212.04089)::

    tau_t = theta_t - theta_pre          theta = theta_pre + lam * sum_t tau_t

A :class:`TaskVector` holds one float32 tensor per trainable parameter (tied parameters once), knows which
transformer block each tensor belongs to (for depth-dependent rules such as LiNeS), and refuses to combine
with a vector over other parameters or shapes. It is built from two models, two state dicts, or a LoRA
result (the adapter is merged first); :meth:`TaskVector.apply_to` writes ``base + scale * tau`` into a copy
of the base model (or returns a state dict when the base is one).
"""

from __future__ import annotations

import copy as copy_module
import math
import re
from numbers import Real
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pandas as pd
import torch
from torch import nn

from ..methods.base import APPLIED_ATTR
from ..nn.view import ModelView

# block indices in state-dict keys of the supported families: GPT-2 "h.3.", Llama "layers.3.", BERT "layer.3."
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")


# ---------------------------------------------------------------------- coercion of models and results
def materialize(obj, owner: str = "merging") -> nn.Module | dict[str, torch.Tensor]:
    """A plain dense model or state dict from a model, a state dict, a path, or a fine-tuning result.

    - a :class:`ftanalysis.FinetuneResult`: ``result.merged_model()`` (LoRA and friends merged first);
    - a model still carrying our adapters (``fta.finetune(..., copy=False)`` leaves them): each applied method
      is merged into a copy;
    - a PEFT ``PeftModel``: ``merge_and_unload`` on a copy;
    - a folder or hub id: :func:`ftanalysis.load_model`;
    - a model or a ``{name: tensor}`` state dict: returned as is.
    """
    from ..train import FinetuneResult

    if isinstance(obj, FinetuneResult):
        return obj.merged_model()
    if isinstance(obj, (str, Path)):
        from ..zoo.loading import load_model

        return load_model(obj)[0]
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{owner} got a state dict whose values are not all tensors (e.g. {bad[:3]}).")
        return dict(obj)
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"{owner} expects models (nn.Module), state dicts, checkpoint folders or FinetuneResult objects. "
            f"Got {type(obj).__name__}."
        )
    applied = getattr(obj, APPLIED_ATTR, [])
    if applied:
        model = copy_module.deepcopy(obj)
        for method in list(applied):
            model = method.merge(model, copy=False)
        return model
    if hasattr(obj, "merge_and_unload") and hasattr(obj, "peft_config"):
        return copy_module.deepcopy(obj).merge_and_unload()
    lora_keys = [n for n, _ in obj.named_parameters() if "lora_" in n]
    if lora_keys:
        raise TypeError(
            f"{owner} got a model with unmerged LoRA parameters ({lora_keys[0]!r}, ...). Merge the adapter first "
            "(result.merged_model() or method.merge(model))."
        )
    return obj


def _parameters(obj: nn.Module | dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({name: tensor}, {alias: name})`` over float tensors, each shared (tied) storage kept once."""
    if isinstance(obj, nn.Module):
        named = dict(obj.named_parameters())  # deduplicates tied parameters
        aliases = {}
        seen = {id(p): n for n, p in named.items()}
        for name, p in obj.named_parameters(remove_duplicate=False):
            if name not in named:
                aliases[name] = seen[id(p)]
        return named, aliases
    params, aliases, seen = {}, {}, {}
    for name, tensor in obj.items():
        if not torch.is_floating_point(tensor):
            continue
        ptr = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride()) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            aliases[name] = seen[ptr]
            continue
        if ptr is not None:
            seen[ptr] = name
        params[name] = tensor
    return params, aliases


def _block_layout(obj) -> tuple[str | None, int | None]:
    """``(block list prefix, number of blocks)`` of a model (via ModelView), or ``(None, None)``."""
    if isinstance(obj, nn.Module):
        try:
            view = ModelView(obj)
        except (TypeError, ValueError):
            return None, None
        return view.block_list_path, view.n_layers
    return None, None


def check_compatible(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str = "models") -> None:
    """Raise ``ValueError`` naming the keys or shapes that differ between two tensor dicts."""
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing or extra:
        raise ValueError(
            f"Cannot combine {what} with different parameters: {len(missing)} only in the first "
            f"({missing[:5]}), {len(extra)} only in the second ({extra[:5]}). Merge models of one architecture "
            "(and the same classifier head), or restrict both to a shared sub-module (e.g. clf.body)."
        )
    for key in a:
        if tuple(a[key].shape) != tuple(b[key].shape):
            raise ValueError(
                f"Cannot combine {what}: parameter {key!r} has shape {tuple(a[key].shape)} in the first and "
                f"{tuple(b[key].shape)} in the second."
            )


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first parameter of ``tensors`` with a NaN or infinite entry.

    A merge of a non-finite model (or with a non-finite weight) would return a NaN model without a word.
    """
    bad = [k for k, v in tensors.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 1} more parameter(s))" if len(bad) > 1 else ""
        raise ValueError(
            f"{what} has NaN or infinite entries in {bad[0]!r}{more}; merging needs finite weights. Check the model "
            "(a diverged fine-tune?) before merging it."
        )


def _check_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"{what} must be a real number. Got {scale!r} instead.")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{what} must be a finite number. Got {scale!r} instead.")
    return float(scale)


# ---------------------------------------------------------------------- the task vector
class TaskVector:
    """``tau = theta_ft - theta_base`` over every trainable float parameter (tied parameters once).

    Task vectors add (``tau_a + tau_b``, ``sum([...])``), subtract, negate and scale (``0.5 * tau``);
    combining two vectors over different parameters or shapes is a ``ValueError``.

    Parameters
    ----------
    vector : dict of str -> Tensor
        The update per parameter name (stored float32, detached, on CPU).
    block_prefix : str, optional
        Key prefix of the transformer block list (e.g. ``"transformer.h"``); used by :meth:`layer_of`.
        Default: found by a regular expression on the key names (``h.3.``, ``layers.3.``, ``layer.3.``).
    n_layers : int, optional
        Number of blocks. Default: one more than the largest block index in the keys.
    aliases : dict of str -> str, optional
        Tied parameters: ``{alias key: stored key}`` (e.g. GPT-2's ``lm_head.weight`` -> ``transformer.wte.weight``).
    new_parameters : tuple of str, optional
        Keys of parameters the pretrained model did not have (e.g. a new classifier head); some rules keep
        their fine-tuned value instead of scaling them.

    Examples
    --------
    >>> import torch
    >>> base = {"layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2)}
    >>> ft = {"layers.0.w": torch.ones(2), "layers.1.w": torch.full((2,), 2.0)}
    >>> tau = TaskVector.from_state_dicts(base, ft)
    >>> (0.5 * tau).apply_to(base)["layers.1.w"].tolist()
    [1.0, 1.0]
    """

    def __init__(
        self,
        vector: Mapping[str, torch.Tensor],
        *,
        block_prefix: str | None = None,
        n_layers: int | None = None,
        aliases: Mapping[str, str] | None = None,
        new_parameters: tuple[str, ...] = (),
    ):
        if not isinstance(vector, Mapping) or not vector:
            raise ValueError(f"The 'vector' parameter of TaskVector must be a non-empty dict of tensors. Got {type(vector).__name__}.")
        bad = [k for k, v in vector.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(
                f"The 'vector' parameter of TaskVector must map names to torch tensors. {bad[0]!r} holds a "
                f"{type(vector[bad[0]]).__name__}."
            )
        self.vector = {k: v.detach().to("cpu", torch.float32) for k, v in vector.items()}
        self.block_prefix = block_prefix
        self.aliases = dict(aliases or {})
        self.new_parameters = tuple(k for k in new_parameters if k in self.vector)
        layers = [layer for layer in (self._parse_layer(k) for k in self.vector) if layer is not None]
        self.n_layers = n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(cls, base, finetuned) -> "TaskVector":
        """``finetuned - base`` for two models (or state dicts, folders, fine-tuning results) of one architecture.

        A LoRA (or other adapter) result is merged into a dense model first. Raises ``ValueError`` when the two
        have different parameter names or shapes.
        """
        base = materialize(base, "TaskVector.from_models")
        finetuned = materialize(finetuned, "TaskVector.from_models")
        base_params, aliases = _parameters(base)
        ft_params, _ = _parameters(finetuned)
        check_compatible(base_params, ft_params, "a base and a fine-tuned model")
        prefix, n_layers = _block_layout(base)
        new = ()
        if isinstance(base, nn.Module) and hasattr(base, "new_parameters"):
            ids = {id(p) for p in base.new_parameters()}
            new = tuple(n for n, p in base.named_parameters() if id(p) in ids)
        vector = {k: ft_params[k].detach().float().cpu() - base_params[k].detach().float().cpu() for k in base_params}
        return cls(vector, block_prefix=prefix, n_layers=n_layers, aliases=aliases, new_parameters=new)

    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> "TaskVector":
        """``finetuned - base`` for two ``{name: tensor}`` dicts (float entries only; tied storage once)."""
        if not isinstance(base, Mapping) or not isinstance(finetuned, Mapping):
            raise TypeError("TaskVector.from_state_dicts expects two dicts of tensors.")
        return cls.from_models(dict(base), dict(finetuned))

    def like(self, vector: Mapping[str, torch.Tensor]) -> "TaskVector":
        """A task vector with new values and this one's metadata (block layout, aliases, new parameters)."""
        return TaskVector(
            vector, block_prefix=self.block_prefix, n_layers=self.n_layers, aliases=self.aliases,
            new_parameters=self.new_parameters,
        )

    # ------------------------------------------------------------------ mapping protocol
    def keys(self):
        return self.vector.keys()

    def items(self):
        return self.vector.items()

    def values(self):
        return self.vector.values()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.vector[key]

    def __contains__(self, key: object) -> bool:
        return key in self.vector

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector)

    def __len__(self) -> int:
        return len(self.vector)

    def numel(self) -> int:
        """Number of scalar entries."""
        return sum(v.numel() for v in self.vector.values())

    def flatten(self) -> torch.Tensor:
        """All entries as one 1-D float32 tensor (keys in insertion order)."""
        return torch.cat([v.reshape(-1) for v in self.vector.values()])

    def unflatten(self, flat: torch.Tensor) -> "TaskVector":
        """The inverse of :meth:`flatten`: a task vector with this one's keys and shapes."""
        if flat.numel() != self.numel():
            raise ValueError(f"unflatten needs {self.numel()} entries. Got {flat.numel()}.")
        out, start = {}, 0
        for key, value in self.vector.items():
            out[key] = flat[start : start + value.numel()].reshape(value.shape)
            start += value.numel()
        return self.like(out)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "TaskVector":
        """A task vector with ``fn(key, tensor)`` applied to every entry."""
        return self.like({k: fn(k, v) for k, v in self.vector.items()})

    # ------------------------------------------------------------------ layers
    def _parse_layer(self, key: str) -> int | None:
        if self.block_prefix is not None:
            head = self.block_prefix + "."
            if not key.startswith(head):
                return None
            return int(key[len(head) :].split(".", 1)[0])
        match = _BLOCK_KEY.search(key)
        return int(match.group(1)) if match else None

    def layer_of(self, key: str) -> int | None:
        """The 0-based block index of a parameter, or ``None`` for embeddings, final norms and heads."""
        if key not in self.vector:
            raise KeyError(f"{key!r} is not a parameter of this task vector.")
        return self._parse_layer(key)

    # ------------------------------------------------------------------ arithmetic
    def _check_other(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"A TaskVector combines only with another TaskVector. Got {type(other).__name__}.")
        check_compatible(self.vector, other.vector, "task vectors")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, Real) and other == 0:
            return self
        self._check_other(other)
        return self.like({k: v + other.vector[k] for k, v in self.vector.items()})

    def __radd__(self, other) -> "TaskVector":
        if isinstance(other, Real) and other == 0:  # sum([...]) starts from 0
            return self
        return self.__add__(other)

    def __neg__(self) -> "TaskVector":
        return self.like({k: -v for k, v in self.vector.items()})

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self + (-other)

    def __mul__(self, scale) -> "TaskVector":
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"A TaskVector is scaled by a real number. Got {type(scale).__name__}.")
        scale = _check_scale(scale, "The scale of a TaskVector")
        return self.like({k: v * scale for k, v in self.vector.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale) -> "TaskVector":
        scale = _check_scale(scale, "The divisor of a TaskVector")
        if scale == 0:
            raise ValueError("The divisor of a TaskVector must be a non-zero finite number. Got 0.")
        return self * (1.0 / scale)

    # ------------------------------------------------------------------ application
    @torch.no_grad()
    def apply_to(self, base, scale: float = 1.0):
        """``base + scale * tau``: a new model (a deep copy of ``base``) or, for a state-dict base, a new dict.

        Parameters not in the task vector (and integer buffers) keep the base's values. ``base`` is never
        modified. Raises ``ValueError`` if ``base`` does not have this vector's parameters and shapes.
        """
        scale = _check_scale(scale, "The 'scale' parameter of TaskVector.apply_to")
        base = materialize(base, "TaskVector.apply_to")
        params, _ = _parameters(base)
        check_compatible(params, self.vector, "a base model and a task vector")
        if isinstance(base, nn.Module):
            model = copy_module.deepcopy(base)
            for name, p in model.named_parameters():
                p.add_((scale * self.vector[name]).to(dtype=p.dtype, device=p.device))
            return model
        out = {k: v.clone() for k, v in base.items()}
        for key, value in self.vector.items():
            out[key] = (base[key].float() + scale * value).to(base[key].dtype)
        for alias, key in self.aliases.items():
            if alias in out:
                out[alias] = out[key]
        return out

    # ------------------------------------------------------------------ reports
    def norm(self, p: float = 2.0) -> float:
        """The ``p``-norm of the whole vector."""
        return float(torch.linalg.vector_norm(self.flatten(), ord=p))

    def to_frame(self) -> pd.DataFrame:
        """One row per parameter: ``name``, ``layer``, ``numel``, ``l2`` and ``l1`` norms."""
        rows = [
            {"name": k, "layer": self._parse_layer(k), "numel": v.numel(), "l2": float(v.norm()), "l1": float(v.abs().sum())}
            for k, v in self.vector.items()
        ]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"TaskVector(parameters={len(self)}, numel={self.numel()}, n_layers={self.n_layers}, l2={self.norm():.4g})"


def task_vectors(base, models, owner: str = "task_vectors") -> list[TaskVector]:
    """``[TaskVector.from_models(base, m) for m in models]`` with the base materialised once.

    Raises ``ValueError`` when the base or a model has NaN or infinite weights (the argument is named).
    """
    if isinstance(models, (nn.Module, Mapping, TaskVector)) or isinstance(models, str) or not hasattr(models, "__iter__"):
        raise TypeError(f"The 'models' parameter of {owner} must be a list of fine-tuned models. Got {type(models).__name__}.")
    base = materialize(base, owner)
    check_finite(_parameters(base)[0], f"The 'base' model of {owner}")
    vectors = []
    for i, m in enumerate(models):
        vector = m if isinstance(m, TaskVector) else TaskVector.from_models(base, m)
        check_finite(vector, f"The 'models' parameter of {owner}: model {i}")
        vectors.append(vector)
    return vectors


def sign_conflicts(vectors: list[TaskVector]) -> float:
    """Share of entries, among those nonzero in at least two vectors, where the nonzero signs disagree."""
    if len(vectors) < 2:
        raise ValueError(f"sign_conflicts needs at least two task vectors. Got {len(vectors)}.")
    for v in vectors[1:]:
        vectors[0]._check_other(v)
    stacked = torch.stack([v.flatten() for v in vectors])  # [tasks, entries]
    signs = torch.sign(stacked)
    nonzero = (signs != 0).sum(0)
    both = (signs > 0).any(0) & (signs < 0).any(0)
    considered = nonzero >= 2
    return float(both[considered].float().mean()) if bool(considered.any()) else 0.0
