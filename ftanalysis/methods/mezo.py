"""MeZO: fine-tuning with forward passes only (a memory-efficient zeroth-order optimiser).

Malladi, Gao, Nichani, Damian, Lee, Chen, Arora 2023, "Fine-Tuning Language Models with Just Forward Passes"
(NeurIPS 2023, arXiv 2305.17333). One step is SPSA with the random direction regenerated from a seed, so the
memory is that of inference: no activations kept for a backward pass, no gradients, no optimiser state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from .._validation import check_float, check_int
from .base import APPLIED_ATTR, Method
from .sparse import mix_seed


def perturbation(param: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """``z ~ N(0, I)`` for the ``index``-th trained parameter at a step seed (regenerated, never stored)."""
    generator = torch.Generator(device=param.device).manual_seed(mix_seed(seed, index))
    return torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32).to(param.dtype)


@torch.no_grad()
def perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """``theta += scale * z(seed)``, one parameter at a time (peak extra memory: one ``z``)."""
    for i, p in enumerate(params):
        p.add_(perturbation(p, seed, i), alpha=scale)


@dataclass(repr=False)
class MeZO(Method):
    """Zeroth-order SGD (SPSA) with two forward passes per step and ``z`` regenerated from a seed.

    Per step, with ``s`` a fresh seed and ``z ~ N(0, I)`` drawn from it::

        theta += eps z;   l+ = L(theta)          (forward passes in eval mode, no autograd)
        theta -= 2 eps z; l- = L(theta)
        theta += eps z                           (restored, to float rounding)
        g = (l+ - l-) / (2 eps)                  (the projected gradient, a scalar)
        theta -= lr * (g z + weight_decay * theta)    (z regenerated from s; no decay on vectors)

    ``E[g z] -> grad L`` as ``eps -> 0`` (``E[z z^T] = I``). The trained parameters are the full model, or, when
    MeZO is applied after another method that it composes with (LoRA), only that method's trainable
    parameters. Use with :func:`ftanalysis.finetune`: ``make_optimizer`` returns None and ``training_step``
    does the update; ``lr`` and ``weight_decay`` come from ``finetune`` (its ``grad_clip`` does not apply).

    Parameters
    ----------
    eps : float, default=1e-3
        Perturbation scale (the paper's value for OPT and RoBERTa).
    seed : int, default=0
        Mixed with the run's seed and the step index into the seed of each step's ``z``.

    Notes
    -----
    The paper's learning rates are small (1e-6 to 1e-7 for full-parameter OPT / RoBERTa-large) and its runs
    long (20k-100k steps); tiny models take larger rates. The loss reported for a step is ``(l+ + l-) / 2``
    (the official code reports ``l+``).
    """

    eps: float = 1e-3
    seed: int = 0
    weight_decay_: float = field(default=0.0, init=False, repr=False, compare=False)
    last_projected_grad_: float = field(default=float("nan"), init=False, repr=False, compare=False)

    name: ClassVar[str] = "mezo"
    paper: ClassVar[str] = "https://arxiv.org/abs/2305.17333"
    composes_with: ClassVar[tuple[str, ...]] = ("lora",)

    def __post_init__(self):
        owner = type(self).__name__
        check_float(self.eps, "eps", owner, low=0.0, low_open=True)
        check_int(self.seed, "seed", owner)

    def _apply(self, model: nn.Module) -> None:
        if not getattr(model, APPLIED_ATTR, []):  # alone: every parameter trains (with LoRA: LoRA's do)
            for p in model.parameters():
                p.requires_grad_(True)

    def _merge(self, model: nn.Module) -> None:
        """MeZO trains in place; a method it was composed with (LoRA) is merged here."""
        for other in list(getattr(model, APPLIED_ATTR, [])):
            if not isinstance(other, MeZO):
                other.merge(model, copy=False)

    # ------------------------------------------------------------------ the step
    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0, fused: bool = False) -> None:
        """No optimiser: the update is done in :meth:`training_step` (so no optimiser state in memory)."""
        if not self.trainable_parameters(model):
            raise ValueError("MeZO left no trainable parameter in the model.")
        if fused:
            raise ValueError("MeZO takes its own zeroth-order steps and has no AdamW to fuse: leave fused_optimizer False.")
        self.weight_decay_ = weight_decay
        return None

    def step_seed(self, run_seed: int, step: int) -> int:
        """The seed ``z`` of step ``step`` is drawn from."""
        return mix_seed(self.seed, run_seed, step)

    @torch.no_grad()
    def projected_gradient(self, params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], seed: int) -> tuple[float, float, float]:
        """``(g, l+, l-)`` with ``g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)``; ``theta`` is restored."""
        perturb(params, seed, self.eps)
        loss_plus = float(loss_fn())
        perturb(params, seed, -2 * self.eps)
        loss_minus = float(loss_fn())
        perturb(params, seed, self.eps)
        return (loss_plus - loss_minus) / (2 * self.eps), loss_plus, loss_minus

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], g: float, seed: int, lr: float) -> None:
        """``theta -= lr * (g z + weight_decay * theta)`` with ``z`` regenerated from ``seed``."""
        for i, p in enumerate(params):
            z = perturbation(p, seed, i)
            if self.weight_decay_ and p.ndim >= 2:
                p.mul_(1 - lr * self.weight_decay_)
            p.add_(z, alpha=-lr * g)

    def training_step(self, state, batch: dict, compute_loss: Callable[[dict], torch.Tensor], grad_clip: float | None) -> torch.Tensor:
        params = [p for _, p in self.trainable_parameters(state.model)]
        seed = self.step_seed(state.seed, state.step)
        was_training = state.model.training
        state.model.eval()  # the official code's forward passes run without dropout
        try:
            g, loss_plus, loss_minus = self.projected_gradient(params, lambda: compute_loss(batch), seed)
        finally:
            state.model.train(was_training)
        loss = torch.tensor((loss_plus + loss_minus) / 2)
        if not torch.isfinite(loss) or g != g:
            return loss
        self.update(params, g, seed, state.lr)
        self.last_projected_grad_ = g
        return loss
