"""Layer and parameter selection: dense base weights train, but only a chosen part of them at a time.

- :class:`HFT`: Half Fine-Tuning (Hui et al. 2024): in every block, a random half of the attention and of the
  MLP matrices is frozen for a stage, then redrawn.
- :class:`LISA`: Layerwise Importance Sampled AdamW (Pan et al. 2024): embeddings and head always train; every
  K steps a few blocks, sampled uniformly, train and the others are frozen.
- :class:`GradientMaskTuning`: (GMT, Li et al. 2024): gradients are accumulated over a few steps and the
  entries with the smallest ``|accumulated gradient|`` get no update.

All three train the base weights directly, so ``merge`` returns the model itself (a copy). Whole tensors are
frozen with ``requires_grad_(False)`` (their gradient is ``None`` and AdamW skips them: no momentum, no weight
decay); parts of a tensor (GPT-2's fused q/k/v in ``c_attn``) go through the entry masks of
:class:`ftanalysis.methods.sparse.EntryMaskedMethod`. The optimiser is built over every parameter that may
train at some step, so its moments persist across stages, as in the papers' implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from .._validation import check_float, check_int, check_option
from ..nn.view import ModelView
from .base import Method
from .sparse import EntryMaskedMethod, mix_seed, named_parameters


def optimizer_over(method: Method, model: nn.Module, params: list[nn.Parameter], lr: float, weight_decay: float, fused: bool = False):
    """The method's default AdamW over ``params`` (all of them, whatever trains at step 0)."""
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        return Method.make_optimizer(method, model, lr=lr, weight_decay=weight_decay, fused=fused)
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------- HFT
@dataclass(repr=False)
class HFT(EntryMaskedMethod):
    """Half fine-tuning: per stage, freeze a random half of each block's matrices and train the rest.

    Hui, Zhang, Wu, Wu, Zhou, Wang, Wang 2024, "HFT: Half Fine-Tuning for Large Language Models"
    (arXiv 2404.18466). The category-level selection (paper's Fig. 2), redrawn at every stage::

        for each block:  freeze 2 of {q, k, v, o}
                         MLP {gate, up, down}: freeze 2 in a random half of the blocks, 1 in the others
                         (a two-matrix MLP, GPT-2 / BERT {up, down}: freeze 1)
        train everything else normally; a stage lasts stage_steps steps

    A frozen matrix's bias is frozen with it. Weights outside the block matrices (embeddings, norms, head)
    train unless ``train_rest=False``.

    Parameters
    ----------
    stage_steps : int, optional
        Steps per stage; a new half is drawn at every stage. Default: one stage for the whole run (one
        selection per fine-tuning job, as for each task of the paper's continual-learning runs).
    seed : int, default=0
        The selection of stage ``s`` is drawn from ``mix_seed(seed, s)``.
    train_rest : bool, default=True
        Train the parameters that are not block matrices. The paper does not say how it treats them (our
        reference notes mark this unverified); set False to train only the selected matrices.

    Attributes
    ----------
    frozen_ : list of str
        Canonical names of the matrices frozen in the current stage.
    """

    stage_steps: int | None = None
    seed: int = 0
    train_rest: bool = True
    frozen_: list = field(default_factory=list, init=False, repr=False, compare=False)
    stage_: int = field(default=-1, init=False, repr=False, compare=False)
    started_: bool = field(default=False, init=False, repr=False, compare=False)

    name: ClassVar[str] = "hft"
    paper: ClassVar[str] = "https://arxiv.org/abs/2404.18466"

    def __post_init__(self):
        owner = type(self).__name__
        if self.stage_steps is not None:
            check_int(self.stage_steps, "stage_steps", owner, 1)
        check_int(self.seed, "seed", owner)
        check_option(self.train_rest, "train_rest", owner, (True, False))

    def _apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(self.train_rest)
        self.started_ = False
        self.select(model, 0)

    def draw(self, view: ModelView, stage: int) -> list[str]:
        """Canonical names frozen at ``stage`` (a pure function of the seed and the stage)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, stage))
        names = view.matrix_names()
        kinds = {group: [n.split(".", 2)[2] for n in names if n.startswith("layers.0.") and n.split(".")[2] == group] for group in ("attn", "mlp")}
        n_layers = view.n_layers
        more = set(torch.randperm(n_layers, generator=generator)[: n_layers // 2].tolist())  # blocks freezing ceil(half)
        frozen = []
        for layer in range(n_layers):
            for members in kinds.values():
                half = len(members) / 2
                n_freeze = int(half) if len(members) % 2 == 0 else (int(half) + 1 if layer in more else int(half))
                order = torch.randperm(len(members), generator=generator)[:n_freeze].tolist()
                frozen += [f"layers.{layer}.{members[i]}" for i in sorted(order)]
        return [n for n in names if n in set(frozen)]

    @torch.no_grad()
    def select(self, model: nn.Module, stage: int) -> None:
        """Freeze the draw of ``stage`` (held values are the current weights)."""
        view = ModelView(model)
        frozen = set(self.draw(view, stage))
        params = named_parameters(model)
        by_module: dict[str, list[str]] = {}
        for name in view.matrix_names():
            by_module.setdefault(view.ref(name).module_path, []).append(name)
        masks, anchors = {}, {}
        for path, members in by_module.items():
            module = view.module(members[0])
            tensors = [(f"{path}.weight", module.weight)]
            if getattr(module, "bias", None) is not None:
                tensors.append((f"{path}.bias", module.bias))
            n_frozen = sum(m in frozen for m in members)
            for pname, p in tensors:
                p.requires_grad_(n_frozen < len(members))
                if 0 < n_frozen < len(members):  # part of a fused tensor (GPT-2 c_attn)
                    mask = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                    for m in members:
                        if m in frozen:
                            ref = view.ref(m)
                            if p.ndim == 2:
                                rows = (mask.T if ref.transposed else mask)
                                rows[ref.out_slice(rows.shape[0])] = False
                            else:
                                mask[ref.out_slice(p.shape[0])] = False
                    masks[pname], anchors[pname] = mask, params[pname].detach().clone()
        self.masks_, self.anchors_ = masks, anchors
        self.frozen_ = sorted(frozen, key=view.matrix_names().index)
        self.stage_ = stage

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0, fused: bool = False):
        view = ModelView(model)
        candidates = [p for p in model.parameters() if p.requires_grad]
        for name in view.matrix_names():
            module = view.module(name)
            candidates += [t for t in (module.weight, getattr(module, "bias", None)) if t is not None]
        unique = list({id(p): p for p in candidates}.values())
        return optimizer_over(self, model, unique, lr, weight_decay, fused)

    def before_step(self, state) -> None:
        stage = state.step // self.stage_steps if self.stage_steps else 0
        if stage != self.stage_ or not self.started_:  # first step: held values are the weights now (after a resume)
            self.select(state.model, stage)
            self.started_ = True
        self.sync(state.model)

    def state_dict(self) -> dict:
        return {}  # the selection is a function of (seed, stage) and frozen values do not move within a stage

    def load_state_dict(self, state: dict) -> None:
        self.started_ = False


# ---------------------------------------------------------------------------------------------- LISA
@dataclass(repr=False)
class LISA(Method):
    """Layerwise importance sampling: a few random blocks train at a time, embeddings and head always.

    Pan, Liu, Diao, Pi, Zhang, Pan, Zhang 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient
    Large Language Model Fine-Tuning" (arXiv 2403.17919)::

        every K = interval steps:  sample gamma = n_layers of the L blocks uniformly without replacement
        train those blocks and everything outside the blocks (embeddings, final norm, head); freeze the rest

    Parameters
    ----------
    n_layers : int, default=2
        gamma, blocks trained at a time ("E+H+2L" in the paper), in [1, L].
    interval : int, default=20
        K, steps between two samplings (LMFlow's ``lisa_interval_steps`` default).
    seed : int, default=0
        The blocks of period ``t // K`` are drawn from ``mix_seed(seed, t // K)``.

    Attributes
    ----------
    active_layers_ : list of int
        Blocks training in the current period.
    history_ : list of dict
        ``{"step", "layers"}`` for every period so far.
    """

    n_layers: int = 2
    interval: int = 20
    seed: int = 0
    active_layers_: list = field(default_factory=list, init=False, repr=False, compare=False)
    history_: list = field(default_factory=list, init=False, repr=False, compare=False)
    period_: int = field(default=-1, init=False, repr=False, compare=False)

    name: ClassVar[str] = "lisa"
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.17919"

    def __post_init__(self):
        owner = type(self).__name__
        check_int(self.n_layers, "n_layers", owner, 1)
        check_int(self.interval, "interval", owner, 1)
        check_int(self.seed, "seed", owner)

    def _apply(self, model: nn.Module) -> None:
        view = ModelView(model)
        if self.n_layers > view.n_layers:
            raise ValueError(f"The 'n_layers' parameter of LISA must be <= the model's {view.n_layers} blocks. Got {self.n_layers}.")
        for p in model.parameters():
            p.requires_grad_(True)
        self.history_ = []
        self.activate(model, 0)

    def draw(self, n_blocks: int, period: int) -> list[int]:
        """Blocks that train in ``period`` (a pure function of the seed and the period)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, period))
        return sorted(torch.randperm(n_blocks, generator=generator)[: self.n_layers].tolist())

    def activate(self, model: nn.Module, period: int, step: int = 0) -> None:
        view = ModelView(model)
        layers = self.draw(view.n_layers, period)
        for layer in range(view.n_layers):
            for p in view.block(layer).parameters():
                p.requires_grad_(layer in layers)
        self.active_layers_, self.period_ = layers, period
        self.history_.append({"step": step, "layers": layers})

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0, fused: bool = False):
        return optimizer_over(self, model, list(model.parameters()), lr, weight_decay, fused)

    def before_step(self, state) -> None:
        period = state.step // self.interval
        if period != self.period_:
            self.activate(state.model, period, state.step)


# ---------------------------------------------------------------------------------------------- GMT
@dataclass(repr=False)
class GradientMaskTuning(Method):
    """Gradient-mask tuning: updates only the entries with the largest accumulated gradient.

    Li, Zhang, Liu, Gong, Wang, Chen, Cheng 2024, "Gradient-Mask Tuning Elevates the Upper Limits of LLM
    Performance" (arXiv 2406.15330)::

        Gamma = (1 / N) sum_{n=1..N} grad L(theta; B_n)          N = accumulation_steps micro-batches
        M     = 1[|Gamma| >= the mask_ratio quantile of |Gamma|]  (per tensor, or over the whole model)
        theta <- optimizer step with gradient M * Gamma,  entries with M = 0 not moved

    Every parameter trains (a dense model throughout); one optimiser update every ``accumulation_steps``
    steps of :func:`ftanalysis.finetune` (each step is a micro-batch; the last update may average fewer).

    Parameters
    ----------
    mask_ratio : float, default=0.2
        Fraction of entries whose update is dropped, in [0, 1) (the paper finds results insensitive to it).
    accumulation_steps : int, default=4
        N, micro-batches accumulated per update.
    scope : {"tensor", "global"}, default="tensor"
        Rank ``|Gamma|`` within each parameter tensor or over all of them.
    hold_masked : bool, default=True
        True: masked entries do not move at this update (their values are restored after the step, so AdamW
        momentum and weight decay cannot move them). False: only their gradient is zeroed (the paper's
        formula applied to Adam, where the momentum still moves them).

    Attributes
    ----------
    masked_fraction_ : list of float
        Fraction of entries masked at each update.
    """

    mask_ratio: float = 0.2
    accumulation_steps: int = 4
    scope: str = "tensor"
    hold_masked: bool = True
    masked_fraction_: list = field(default_factory=list, init=False, repr=False, compare=False)
    micro_: int = field(default=0, init=False, repr=False, compare=False)

    name: ClassVar[str] = "gmt"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.15330"

    def __post_init__(self):
        owner = type(self).__name__
        check_float(self.mask_ratio, "mask_ratio", owner, low=0.0, high=1.0, high_open=True)
        check_int(self.accumulation_steps, "accumulation_steps", owner, 1)
        check_option(self.scope, "scope", owner, ("tensor", "global"))
        check_option(self.hold_masked, "hold_masked", owner, (True, False))

    def _apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        self.masked_fraction_, self.micro_ = [], 0

    @torch.no_grad()
    def masks(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep-masks (True = updated) for a list of gradients: the ``mask_ratio`` smallest ``|g|`` dropped."""
        if self.scope == "global":
            flat = torch.cat([g.abs().reshape(-1).float() for g in grads])
            n = int(self.mask_ratio * flat.numel())
            keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
            if n:
                keep[torch.topk(flat, n, largest=False).indices] = False
            out, start = [], 0
            for g in grads:
                out.append(keep[start : start + g.numel()].view(g.shape))
                start += g.numel()
            return out
        out = []
        for g in grads:
            n = int(self.mask_ratio * g.numel())
            keep = torch.ones(g.numel(), dtype=torch.bool, device=g.device)
            if n:
                keep[torch.topk(g.abs().reshape(-1).float(), n, largest=False).indices] = False
            out.append(keep.view(g.shape))
        return out

    def training_step(self, state, batch: dict, compute_loss: Callable[[dict], torch.Tensor], grad_clip: float | None) -> torch.Tensor:
        loss = compute_loss(batch)
        if not torch.isfinite(loss):
            return loss.detach()
        loss.backward()  # gradients add up in .grad until the update
        self.micro_ += 1
        if self.micro_ < self.accumulation_steps and state.step + 1 < state.steps:
            return loss.detach()
        params = [p for _, p in self.trainable_parameters(state.model) if p.grad is not None]
        with torch.no_grad():
            for p in params:
                p.grad.div_(self.micro_)
            keeps = self.masks([p.grad for p in params])
            for p, keep in zip(params, keeps):
                p.grad.mul_(keep)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.after_backward(state)
        held = [p.detach()[~keep].clone() for p, keep in zip(params, keeps)] if self.hold_masked else None
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if held is not None:
            with torch.no_grad():
                for p, keep, values in zip(params, keeps, held):
                    p.data[~keep] = values
        total = sum(k.numel() for k in keeps)
        self.masked_fraction_.append(sum(int((~k).sum()) for k in keeps) / max(1, total))
        self.micro_ = 0
        return loss.detach()
