"""TuCo: how much the fine-tuning component contributes to a response, and steering by scaling it.

Nuti, Franzmeyer, Henriques 2025, "TuCo: Measuring the Contribution of Fine-Tuning to Individual Responses
of LLMs" (ICML 2025, arXiv 2506.23423), Algorithm 1. Run the fine-tuned model; at every block ``l``, on the
*same* input residual state ``x_l``, split the block's update into the pretrained and the fine-tuning
component::

    PTC_l = f_PT(x_l, l)                  (the base block's update:  base_block(x_l) - x_l)
    FTC_l = f_FT(x_l, l) - PTC_l          (fine-tuned block's update minus the base block's)
    x_{l+1} = x_l + PTC_l + FTC_l         (exactly the fine-tuned forward pass)

    TuCo = ||sum_l FTC_l[-1]|| / (||sum_l PTC_l[-1]|| + ||sum_l FTC_l[-1]||)     (at the last prompt token)

TuCo is in [0, 1]: 0 when the fine-tuned blocks compute what the base blocks compute on that prompt.

Steering (:func:`steer`) scales the fine-tuning component: ``x_{l+1} = x_l + PTC_l + alpha * FTC_l``, i.e.
``base_block(x_l) + alpha * (ft_block(x_l) - base_block(x_l))``. The paper decomposes the blocks only (its
models share embeddings and unembedding); a full fine-tune here also moves the embeddings, final norm and
head, so :func:`steer` interpolates those parameters too, ``theta_PT + alpha (theta_FT - theta_PT)``
(``ends="interpolate"``, the default): then ``alpha = 1`` is exactly the fine-tuned model and ``alpha = 0``
exactly the base. ``ends="finetuned"`` keeps the fine-tuned ones (the paper's setting).
"""

from __future__ import annotations

import copy as copy_module
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import torch
from transformers.cache_utils import Cache

from .._validation import check_float, check_int, check_option
from ..nn.view import ModelView
from .similarity import block_output, encode, pool, prompts_of

ENDS = ("interpolate", "finetuned")


def _strip_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Block arguments without a KV cache (the base block must not write into the fine-tuned model's cache)."""
    args = tuple(None if isinstance(a, Cache) else a for a in args)
    kwargs = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _replace_output(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def _check_pair(base, ft) -> tuple[ModelView, ModelView]:
    if base is ft:
        raise ValueError(
            "The 'base' and 'ft' parameters must be two model objects: the same one was passed for both (its blocks' "
            "hooks would call themselves). To compare a model with itself, pass a copy: copy.deepcopy(model)."
        )
    view_base, view_ft = ModelView(base), ModelView(ft)
    if view_base.family != view_ft.family or view_base.n_layers != view_ft.n_layers or view_base.d_model != view_ft.d_model:
        raise ValueError(
            f"TuCo needs a base and a fine-tuned model of one architecture. Got {view_base!r} and {view_ft!r}."
        )
    return view_base, view_ft


@contextmanager
def decomposition_hooks(base, ft, alpha: float = 1.0, record: list | None = None):
    """Hook ``ft``'s blocks so that each outputs ``base_block(x) + alpha * (ft_block(x) - base_block(x))``.

    ``record``, if given, receives per block ``(PTC_l, FTC_l)`` tensors ``[batch, pos, d_model]`` of each
    forward pass. With ``alpha = 1`` the output is unchanged. Hooks are removed on exit, even after an error.
    """
    view_base, view_ft = _check_pair(base, ft)
    handles = []
    try:
        for layer, block in enumerate(view_ft.blocks):
            base_block = view_base.blocks[layer]

            def hook(_, args, kwargs, output, base_block=base_block):
                x = args[0] if args else kwargs["hidden_states"]
                b_args, b_kwargs = _strip_cache(args, kwargs)
                base_out = block_output(base_block(*b_args, **b_kwargs))
                ft_out = block_output(output)
                if record is not None:
                    record.append(((base_out - x).detach(), (ft_out - base_out).detach()))
                if alpha == 1.0:
                    return None
                return _replace_output(output, base_out + alpha * (ft_out - base_out))

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def steer(base, ft, alpha: float, ends: str = "interpolate"):
    """A copy of ``ft`` whose fine-tuning component is scaled by ``alpha``, for use inside the ``with`` block.

    ``alpha = 1``: the fine-tuned model; ``alpha = 0``: the base (with ``ends="interpolate"``); values above 1
    amplify the fine-tuning. Neither model is modified.

    >>> with steer(base, ft, alpha=0.5) as model:   # doctest: +SKIP
    ...     task.evaluate(model, tok)
    """
    check_float(alpha, "alpha", "steer")
    check_option(ends, "ends", "steer", ENDS)
    view_base, view_ft = _check_pair(base, ft)
    steered = copy_module.deepcopy(ft)
    if getattr(steered, "config", None) is not None:
        steered.config.use_cache = False
    if ends == "interpolate":
        prefix = view_ft.block_list_path + "."
        base_params = dict(base.named_parameters())
        with torch.no_grad():
            for name, p in steered.named_parameters():
                if not name.startswith(prefix):
                    if name not in base_params or base_params[name].shape != p.shape:
                        raise ValueError(f"steer: parameter {name!r} has no counterpart of the same shape in the base model.")
                    b = base_params[name].to(p.device, p.dtype)
                    p.copy_(b + alpha * (p - b))
    steered.eval()
    with decomposition_hooks(base, steered, alpha=alpha):
        yield steered


@dataclass
class TuCoResult:
    """TuCo per prompt, with the norms of the summed components and their per-layer norms.

    ``ptc_layer`` and ``ftc_layer`` are ``[n_prompts, n_layers]``: ``||PTC_l||`` and ``||FTC_l||`` at the
    pooled position.
    """

    prompts: list[str]
    tuco: torch.Tensor
    ptc_norm: torch.Tensor
    ftc_norm: torch.Tensor
    ptc_layer: torch.Tensor
    ftc_layer: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.tuco.mean())

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "prompt": self.prompts,
            "tuco": self.tuco.tolist(),
            "ptc_norm": self.ptc_norm.tolist(),
            "ftc_norm": self.ftc_norm.tolist(),
        })

    def layer_frame(self) -> pd.DataFrame:
        """Mean ``||PTC_l||`` and ``||FTC_l||`` per layer."""
        return pd.DataFrame({
            "layer": range(self.ptc_layer.shape[1]),
            "ptc_norm": self.ptc_layer.mean(0).tolist(),
            "ftc_norm": self.ftc_layer.mean(0).tolist(),
        })

    def plot(self, ax=None, label: str | None = None, bins: int = 30):
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 3))
        ax.hist(self.tuco.numpy(), bins=bins, range=(0, 1), alpha=0.6, label=label)
        ax.set_xlabel("TuCo")
        ax.set_ylabel("prompts")
        if label:
            ax.legend(frameon=False)
        fig.tight_layout()
        return fig


@torch.no_grad()
def tuco(base, ft, tok, inputs, n: int | None = 256, split: str = "test", position: str = "last", batch_size: int = 64) -> TuCoResult:
    """The Tuning Contribution of ``ft`` over ``base`` on each prompt (Nuti et al. 2025, Algorithm 1).

    Parameters
    ----------
    base, ft : the pretrained and the fine-tuned model (one architecture; neither is modified).
    tok : their tokenizer.
    inputs : a Task (its first ``n`` prompts of ``split``), a list of Examples, or a list of prompt strings.
    position : {"last", "mean"}, default="last"
        Where the components are read: the last prompt token (the paper) or the mean over real tokens.

    Returns
    -------
    TuCoResult
        ``tuco`` ``[n]`` in [0, 1]; ``ptc_norm``/``ftc_norm`` ``[n]`` the norms of the summed components.
    """
    check_option(position, "position", "tuco", ("last", "mean"))
    check_int(batch_size, "batch_size", "tuco", 1)
    prompts = prompts_of(inputs, n, split)
    device = next(ft.parameters()).device
    states = (base.training, ft.training)
    base.eval()
    ft.eval()
    scores, ptc_sum_norms, ftc_sum_norms, ptc_layers, ftc_layers = [], [], [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode(tok, prompts[start : start + batch_size], device)
            record: list = []
            with decomposition_hooks(base, ft, alpha=1.0, record=record):
                ft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = batch["attention_mask"]
            ptc = torch.stack([pool(p.float(), mask, position) for p, _ in record], 1)  # [batch, layers, d_model]
            ftc = torch.stack([pool(f.float(), mask, position) for _, f in record], 1)
            ptc_total, ftc_total = ptc.sum(1).norm(dim=-1), ftc.sum(1).norm(dim=-1)  # [batch]
            scores.append(ftc_total / (ptc_total + ftc_total).clamp_min(1e-12))
            ptc_sum_norms.append(ptc_total)
            ftc_sum_norms.append(ftc_total)
            ptc_layers.append(ptc.norm(dim=-1))
            ftc_layers.append(ftc.norm(dim=-1))
    finally:
        base.train(states[0])
        ft.train(states[1])
    return TuCoResult(
        prompts=prompts,
        tuco=torch.cat(scores).cpu(),
        ptc_norm=torch.cat(ptc_sum_norms).cpu(),
        ftc_norm=torch.cat(ftc_sum_norms).cpu(),
        ptc_layer=torch.cat(ptc_layers).cpu(),
        ftc_layer=torch.cat(ftc_layers).cpu(),
    )

