"""LoRA: a trainable low-rank update next to each frozen weight matrix.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685)::

    h = W0 x + (alpha / r) * B A x          A: (r, in), B: (out, r), B = 0 at init

rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by ``alpha / sqrt(r)`` instead. PiSSA (Meng et al. 2024,
arXiv 2404.02948) starts A and B from the top-r singular triplets of W0 and trains them while the residual
``W0 - (alpha/r) B A`` stays frozen. "Asymmetry in Low-Rank Adapters" (Zhu et al. 2024, arXiv 2402.16842):
training only B (``train_a=False``) with a random A loses little.

Numerics follow Hugging Face PEFT (``lora_A``/``lora_B`` names, dropout on the input of A, the delta computed in
float32) so that adapters convert both ways (:func:`ftanalysis.export_peft`, :func:`ftanalysis.load_peft`).

GPT-2's fused ``c_attn`` is adapted per canonical matrix: targeting ``attn.q`` adds a rank-r update to the q
third of its output only; targeting q, k and v gives three independent rank-r updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_float, check_int, check_option
from ..nn.view import ModelView, unwrap
from .base import Method
from .targets import resolve_targets, take_target_modules

LORA_INITS = ("gaussian", "kaiming", "pissa", "corda")
CORDA_HINT = (
    "The 'init' parameter of LoRA cannot be 'corda': CorDA needs calibration data. Use "
    "fta.methods.CorDA(r=..., mode='ipm' or 'kpm') instead (fta.finetune calibrates it on the task)."
)


class LoRALayer(nn.Module):
    """Wraps one ``nn.Linear`` or GPT-2 ``Conv1D`` and adds low-rank updates to parts of its output.

    ``parts`` maps a key (``"full"``, or ``"q"``/``"k"``/``"v"`` for a fused GPT-2 ``c_attn``) to the
    output rows it updates. Each part has ``lora_A[key]`` of shape ``(r, in)`` and ``lora_B[key]`` of shape
    ``(rows, r)``.
    """

    def __init__(self, base_layer: nn.Module, parts: dict[str, slice], r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        weight = base_layer.weight
        self.in_features, self.out_features = (weight.shape if self.fan_in_fan_out else weight.shape[::-1])
        self.r = r
        self.scaling = scaling
        self.parts = dict(parts)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kwargs = {"dtype": torch.float32, "device": weight.device}
        self.lora_A = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(r, self.in_features, **kwargs)) for k in self.parts}
        )
        self.lora_B = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(s.stop - s.start, r, **kwargs)) for k, s in self.parts.items()}
        )
        covered = sorted((s.start, s.stop) for s in self.parts.values())
        self._full_cover = covered[0][0] == 0 and covered[-1][1] == self.out_features and all(
            a[1] == b[0] for a, b in zip(covered, covered[1:])
        )
        self._order = sorted(self.parts, key=lambda k: self.parts[k].start)
        # True when the wrapped weight holds W0 - scaling * B0 @ A0 (PiSSA, CorDA) rather than W0
        self.residual_base = False
        self.train(base_layer.training)  # a new Dropout would otherwise be active inside a model in eval mode

    # (out, in) weight of the wrapped layer, as a view
    def base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self, key: str) -> torch.Tensor:
        """``scaling * B @ A`` for one part, ``(rows, in)``, float32."""
        return self.scaling * (self.lora_B[key].float() @ self.lora_A[key].float())

    def update_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (R, in), B (rows, R))``, float32 and detached, with ``scaling * B @ A`` the part's whole update.

        The live adapter here; :class:`ftanalysis.methods.chain.ChainLoRALayer` adds the links already merged.
        """
        return self.lora_A[key].detach().float(), self.lora_B[key].detach().float()

    def part_update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """The low-rank contribution of one part for input ``x`` (already through dropout)."""
        A, B = self.lora_A[key], self.lora_B[key]
        return F.linear(F.linear(x.to(A.dtype), A), B) * self.scaling  # [..., rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_dropout(x)
        if len(self._order) == 1:
            updates = {k: self.part_update(k, h) for k in self._order}
        else:
            # one pass over x for every part (GPT-2's fused c_attn): x @ [A_q; A_k; A_v]^T, then each B on its slice
            A = torch.cat([self.lora_A[k] for k in self._order])
            hA = F.linear(h.to(A.dtype), A)
            if self._full_cover:  # the parts tile the output: one matmul with the block-diagonal [B_q, B_k, B_v]
                delta = F.linear(hA, torch.block_diag(*[self.lora_B[k] for k in self._order])) * self.scaling
                return result + delta.to(result.dtype)
            updates = {
                k: F.linear(hA[..., i * self.r : (i + 1) * self.r], self.lora_B[k]) * self.scaling
                for i, k in enumerate(self._order)
            }
        if self._full_cover:
            delta = updates[self._order[0]] if len(updates) == 1 else torch.cat([updates[k] for k in self._order], dim=-1)
        else:
            delta = result.new_zeros(result.shape, dtype=updates[self._order[0]].dtype)
            for k, u in updates.items():
                s = self.parts[k]
                delta[..., s.start : s.stop] = u
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The ``(out, in)`` float32 weight with every part's update folded in."""
        w = self.base_weight().float().clone()
        for k, s in self.parts.items():
            w[s] += self.delta_weight(k)
        return w

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, parts={list(self._order)}"


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


@torch.no_grad()
def write_dense(layer: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Write an ``(out, in)`` matrix into an ``nn.Linear`` or ``Conv1D`` weight, in its own orientation."""
    target = layer.weight
    value = weight_out_in.T if type(layer).__name__ == "Conv1D" else weight_out_in
    target.copy_(value.to(target.dtype))


def part_key(kind: str, n_parts: int) -> str:
    """``"q"``/``"k"``/``"v"`` for a third of a fused projection, ``"full"`` otherwise."""
    return kind.split(".")[-1] if n_parts > 1 else "full"


@dataclass(repr=False)
class LoRA(Method):
    """Low-rank adaptation: ``W = W0 + scaling * B @ A`` on every targeted matrix, everything else frozen.

    Parameters
    ----------
    r : int, default=8
        Rank, in [1, min(out, in)] of every targeted matrix.
    alpha : float, default=16
        Scaling numerator: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
    dropout : float, default=0.0
        Dropout on the input of A, in [0, 1).
    target : str or list of str, default="all-linear"
        Canonical names, kinds (``"attn.q"``, ``"mlp"``), Hugging Face module names (``"q_proj"``,
        ``"c_attn"``), regular expressions or ``"all-linear"``. ``target_modules=`` (PEFT's name) is an alias.
    init : {"gaussian", "kaiming", "pissa", "corda"}, default="gaussian"
        ``gaussian``: A ~ N(0, 1/r^2) and B = 0 (the paper's random Gaussian A, with PEFT's std);
        ``kaiming``: PEFT's default Kaiming-uniform A; ``pissa``: principal singular vectors (see module
        docstring); ``corda`` needs calibration data, so ``LoRA`` rejects it: use
        :class:`ftanalysis.methods.CorDA`.
    rslora : bool, default=False
        Rank-stabilised scaling ``alpha / sqrt(r)``.
    train_a : bool, default=True
        False freezes A at its initialisation and trains only B (Zhu et al. 2024).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str | list[str] = "all-linear"
    init: str = "gaussian"
    rslora: bool = False
    train_a: bool = True
    target_modules: str | list[str] | None = field(default=None, repr=False)
    targets_: list[str] = field(default_factory=list, init=False, repr=False)

    # True only for subclasses that bring the calibration data an init needs (CorDA)
    calibrated_init: ClassVar[bool] = False

    name: ClassVar[str] = "lora"
    paper: ClassVar[str] = "https://arxiv.org/abs/2106.09685"
    composes_with: ClassVar[tuple[str, ...]] = ("mezo",)
    # the wrapper class put around every targeted layer (DoRA swaps in its own)
    layer_cls: ClassVar[type[LoRALayer]] = LoRALayer

    def __post_init__(self):
        owner = type(self).__name__
        check_int(self.r, "r", owner, 1)
        check_float(self.alpha, "alpha", owner, low=0.0, low_open=True)
        check_float(self.dropout, "dropout", owner, low=0.0, high=1.0, high_open=True)
        check_option(self.init, "init", owner, LORA_INITS)
        if self.init == "corda" and not self.calibrated_init:
            raise ValueError(CORDA_HINT)
        take_target_modules(self, "all-linear")
        if isinstance(self.target, (list, tuple)):
            self.target = list(self.target)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    # ------------------------------------------------------------------ apply
    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        names = resolve_targets(view, self.target, owner=type(self).__name__)
        for name in names:
            out, inp = view.get(name).shape
            if self.r > min(out, inp):
                raise ValueError(
                    f"The 'r' parameter of {type(self).__name__} must be <= min(out, in) = {min(out, inp)} for "
                    f"{name} of shape ({out}, {inp}). Got {self.r}."
                )
        for p in model.parameters():
            p.requires_grad_(False)
        by_module: dict[str, list[str]] = {}
        for name in names:
            by_module.setdefault(view.ref(name).module_path, []).append(name)
        for path, group in by_module.items():
            base = unwrap(model.get_submodule(path))
            out_features = base.weight.shape[1] if type(base).__name__ == "Conv1D" else base.weight.shape[0]
            parts = {}
            for name in group:
                ref = view.ref(name)
                parts[part_key(ref.kind, ref.n_parts)] = ref.out_slice(out_features)
            layer = self.layer_cls(base, parts, self.r, self.scaling, self.dropout)
            self.initialise(layer, model, path)
            layer.lora_A.requires_grad_(self.train_a)
            replace_module(model, path, layer)
        self.targets_ = names

    @torch.no_grad()
    def initialise(self, layer: LoRALayer, model: nn.Module, path: str) -> None:
        """Set A and B (and, for PiSSA, the frozen residual) of one wrapped layer."""
        for key, s in layer.parts.items():
            A, B = layer.lora_A[key], layer.lora_B[key]
            if self.init == "gaussian":
                nn.init.normal_(A, std=1 / self.r)
                B.zero_()
            elif self.init == "kaiming":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                B.zero_()
            elif self.init == "pissa":
                W = layer.base_weight()[s].float()  # (rows, in)
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                root = torch.sqrt(S[: self.r] / layer.scaling)
                A.copy_(root[:, None] * Vh[: self.r])
                B.copy_(U[:, : self.r] * root[None, :])
                residual = W - layer.scaling * (B @ A)
                full = layer.base_weight().float().clone()
                full[s] = residual
                write_dense(layer.base_layer, full)
                layer.residual_base = True
            elif self.init == "corda":
                raise ValueError(CORDA_HINT)

    # ------------------------------------------------------------------ merge
    def _merge(self, model: nn.Module) -> None:
        wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
        if not wrapped:
            raise ValueError(f"{type(self).__name__}.merge: the model carries no LoRA layer (was apply called?).")
        for path, layer in wrapped:
            merged = layer.merged_weight()
            write_dense(layer.base_layer, merged)
            replace_module(model, path, layer.base_layer)

    def lora_layers(self, model: nn.Module) -> dict[str, LoRALayer]:
        """``{module path: LoRALayer}`` of a model this method was applied to."""
        return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{canonical name: scaling * B @ A}`` in ``(out, in)`` orientation (ChainLoRA: every link's, summed)."""
        view = ModelView(model)
        out = {}
        for name in view.matrix_names():
            wrapper = view.wrapper(name)
            if isinstance(wrapper, LoRALayer):
                ref = view.ref(name)
                key = part_key(ref.kind, ref.n_parts)
                if key in wrapper.parts:
                    A, B = wrapper.update_factors(key)
                    out[name] = wrapper.scaling * (B @ A)
        return out
