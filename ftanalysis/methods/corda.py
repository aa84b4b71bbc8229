"""CorDA: LoRA initialised from a covariance-oriented SVD of each weight, calibrated on a few batches.

Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning" (arXiv 2406.05223). For each targeted layer with input
activations X (tokens x in) collected on a few calibration batches::

    C = X^T X / n_tokens                     (in, in) input covariance
    W C = U S V^T                            SVD of the weight "oriented" by the covariance
    W = U S (V^T C^{-1})                     an exact decomposition of W
    B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) (V^T C^{-1})_r,   W_res = W - s B A   (frozen)

Two modes choose the r components that become the trainable adapter:

- ``"ipm"`` (instruction-previewed): calibrate on the fine-tuning task; adapt the r *largest* components,
  those that matter most for the task's inputs.
- ``"kpm"`` (knowledge-preserving): calibrate on knowledge data (here the pretraining mix); adapt the r
  *smallest* components and keep the principal ones, which carry that knowledge, frozen in ``W_res``.

Like PEFT, C is damped before use: ``C + damping * mean(diag C) * I``; the decomposition stays exact
because ``(W C) C^{-1} = W`` for any invertible C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

import torch
from torch import nn

from .._validation import check_float, check_int, check_option
from ..nn.view import ModelView, unwrap
from .lora import LoRA, LoRALayer, part_key, write_dense
from .targets import resolve_targets

CORDA_MODES = ("ipm", "kpm")


@dataclass(repr=False)
class CorDA(LoRA):
    """LoRA with A and B from the covariance-oriented SVD of each weight (CorDA), residual frozen.

    Yang et al. 2024, "CorDA" (arXiv 2406.05223): ``SVD(W C) = U S V^T``, ``W = U S V^T C^{-1}``; the adapter
    takes the r largest (``"ipm"``) or r smallest (``"kpm"``) components, ``W_res = W - s B A`` stays frozen,
    so the adapted model computes the base model at initialisation (up to float rounding).

    Parameters
    ----------
    r, alpha, dropout, target, rslora, train_a
        As in :class:`ftanalysis.methods.LoRA` (r=8, alpha=16, "all-linear").
    mode : {"ipm", "kpm"}, default="ipm"
        Instruction-previewed (adapt the principal components of the task's covariance) or
        knowledge-preserving (adapt the smallest components of the knowledge data's covariance).
    calibration_task : str or Task, optional
        Where the calibration batches come from under :func:`ftanalysis.finetune`. Default: the task being
        fine-tuned for ``"ipm"``, ``"pretraining_mix"`` for ``"kpm"`` (the knowledge the base should keep).
    n_batches : int, default=4
        Calibration batches ("a few": the paper uses 256 samples; our models are tiny).
    batch_size : int, default=32
        Examples per calibration batch.
    damping : float, default=0.01
        Relative ridge added to C before inversion (PEFT's starting value).

    Attributes
    ----------
    covariances_ : dict of module path -> (in, in) float64 tensor, set by :meth:`calibrate`.
    calibration_tokens_ : int, tokens seen in calibration.
    singular_values_ : dict of canonical name -> (min(out, in),) tensor, the S of ``W C``, set by ``apply``.

    Notes
    -----
    Pad tokens are left out of C (the attention mask selects real tokens). Without :func:`finetune`, call
    :meth:`calibrate` with your own batches before :meth:`apply`.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> task = fta.tasks.make("modular_arithmetic", op="-")
    >>> corda = fta.methods.CorDA(r=4, mode="kpm", target="attn")
    >>> result = fta.finetune(model, tok, task, corda, steps=2, progress=False)   # calibrates on the mix
    >>> corda = fta.methods.CorDA(r=4, target="attn")
    >>> _ = corda.calibrate(model, [task.batch(tok, 16, step=i) for i in range(2)])
    >>> adapted = corda.apply(model, copy=True)
    """

    mode: str = "ipm"
    calibration_task: object = None
    n_batches: int = 4
    batch_size: int = 32
    damping: float = 0.01
    init: str = field(default="corda", init=False, repr=False)
    covariances_: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    calibration_tokens_: int = field(default=0, init=False, repr=False, compare=False)
    calibration_source_: str = field(default="", init=False, repr=False, compare=False)
    singular_values_: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    name: ClassVar[str] = "corda"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.05223"
    calibrated_init: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_option(self.mode, "mode", owner, CORDA_MODES)
        check_int(self.n_batches, "n_batches", owner, 1)
        check_int(self.batch_size, "batch_size", owner, 1)
        check_float(self.damping, "damping", owner, low=0.0, low_open=True)
        if self.calibration_task is not None and not isinstance(self.calibration_task, str):
            from ..tasks import Task

            if not isinstance(self.calibration_task, Task):
                raise TypeError(
                    f"The 'calibration_task' parameter of {owner} must be a task name, a Task or None. "
                    f"Got {type(self.calibration_task).__name__} instead."
                )

    # ------------------------------------------------------------------ calibration
    def prepare(self, model: nn.Module, tok, task, seed: int = 0) -> None:
        """Calibrate on ``n_batches`` training batches of the calibration task (called by ``fta.finetune``).

        Skipped when :meth:`calibrate` was already called by the user with their own batches.
        """
        if self.calibration_source_ == "user":
            return
        from ..tasks import make

        source = self.calibration_task
        if source is None:
            source = task if self.mode == "ipm" else "pretraining_mix"
        if isinstance(source, str):
            source = make(source)
        source.check_tokenizer(tok)
        batches = [source.batch(tok, self.batch_size, step=i, split="train", seed=seed) for i in range(self.n_batches)]
        self.calibrate(model, batches)
        self.calibration_source_ = f"task:{source.name}"

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable) -> CorDA:
        """Accumulate the input covariance ``C = X^T X / n`` of every targeted layer over ``batches``.

        Parameters
        ----------
        model : the base model (not modified; run in eval mode, then restored).
        batches : iterable of dicts with ``input_ids`` (and optionally ``attention_mask``), or of LongTensors
            ``[batch, pos]`` of token ids.

        Returns
        -------
        self, with ``covariances_`` and ``calibration_tokens_`` set.
        """
        view = ModelView(model)
        names = resolve_targets(view, self.target, owner=type(self).__name__)
        paths = list(dict.fromkeys(view.ref(n).module_path for n in names))
        device = next(model.parameters()).device
        sums: dict[str, torch.Tensor] = {}
        current_mask: list[torch.Tensor | None] = [None]

        def make_hook(path):
            def hook(module, args):
                x = args[0].detach()  # [batch, pos, in]
                flat = x.reshape(-1, x.shape[-1]).double()  # [tokens, in]
                mask = current_mask[0]
                if mask is not None:
                    flat = flat[mask.reshape(-1).bool()]
                sums[path] = sums.get(path, 0) + flat.T @ flat  # (in, in)

            return hook

        handles = []
        was_training = model.training
        n_tokens, n_batches = 0, 0
        try:
            for path in paths:
                handles.append(unwrap(model.get_submodule(path)).register_forward_pre_hook(make_hook(path)))
            model.eval()
            for batch in batches:
                ids, mask = _unpack(batch, type(self).__name__)
                ids = ids.to(device)
                mask = None if mask is None else mask.to(device)
                current_mask[0] = mask
                model(input_ids=ids, attention_mask=mask)
                n_tokens += int(mask.sum()) if mask is not None else ids.numel()
                n_batches += 1
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if n_batches == 0 or n_tokens == 0:
            raise ValueError(f"{type(self).__name__}.calibrate got no calibration tokens: pass at least one non-empty batch.")
        self.covariances_ = {path: total / n_tokens for path, total in sums.items()}
        self.calibration_tokens_ = n_tokens
        self.calibration_source_ = "user"
        return self

    # ------------------------------------------------------------------ apply
    def _apply(self, model: nn.Module) -> None:
        if not self.covariances_:
            raise ValueError(
                f"{type(self).__name__} needs calibration before apply: call method.calibrate(model, batches) "
                "with a few batches of inputs, or pass the method to fta.finetune, which calibrates it on the task."
            )
        view = ModelView(model)
        missing = sorted({view.ref(n).module_path for n in resolve_targets(view, self.target, owner=type(self).__name__)} - set(self.covariances_))
        if missing:
            raise ValueError(
                f"{type(self).__name__} was calibrated on other layers than it targets now (no covariance for {missing[:3]}). "
                "Calibrate again on this model with the same target."
            )
        self.singular_values_ = {}
        self._part_names = {}
        for name in view.matrix_names():
            ref = view.ref(name)
            self._part_names[(ref.module_path, part_key(ref.kind, ref.n_parts))] = name
        super()._apply(model)

    @torch.no_grad()
    def initialise(self, layer: LoRALayer, model: nn.Module, path: str) -> None:
        """A, B from the covariance-oriented SVD of each part; the frozen weight becomes the residual."""
        C = self.covariances_[path].to(layer.base_weight().device)
        n = C.shape[0]
        C = C + self.damping * C.diagonal().mean().clamp_min(1e-12) * torch.eye(n, dtype=C.dtype, device=C.device)
        full = layer.base_weight().double().clone()  # (out, in)
        for key, s in layer.parts.items():
            W = full[s]  # (rows, in)
            U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
            Vt = torch.linalg.solve(C, Vh.T).T  # V^T C^{-1}, (k, in); C is symmetric
            pick = slice(0, self.r) if self.mode == "ipm" else slice(S.shape[0] - self.r, S.shape[0])
            root = torch.sqrt(S[pick] / layer.scaling)
            A = root[:, None] * Vt[pick]  # (r, in)
            B = U[:, pick] * root[None, :]  # (rows, r)
            layer.lora_A[key].copy_(A.float())
            layer.lora_B[key].copy_(B.float())
            full[s] = W - layer.scaling * (B @ A)
            self.singular_values_[self._part_names.get((path, key), f"{path}:{key}")] = S.float().cpu()
        write_dense(layer.base_layer, full.float())
        layer.residual_base = True

    def condition_numbers(self) -> dict[str, float]:
        """``{module path: cond(C)}`` of the calibrated covariances (before damping); large means few directions."""
        out = {}
        for path, C in self.covariances_.items():
            eig = torch.linalg.eigvalsh(C)
            out[path] = float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf
        return out


def _unpack(batch, owner: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` from a batch dict or a tensor of ids."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, dict) and "input_ids" in batch:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(
            f"{owner}.calibrate expects batches that are dicts with 'input_ids' (and 'attention_mask') or LongTensors "
            f"of token ids. Got {type(batch).__name__}."
        )
    if ids.dim() != 2:
        raise ValueError(f"{owner}.calibrate expects input_ids of shape [batch, pos]. Got shape {tuple(ids.shape)}.")
    return ids, mask
