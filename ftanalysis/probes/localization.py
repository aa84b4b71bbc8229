"""Skill localization by grafting: which few fine-tuned parameters carry the skill?

Panigrahi, Saunshi, Zhao and Arora, "Task-Specific Skill Localization in Fine-tuned Language Models",
ICML 2023 (arXiv 2302.06600). With ``tau = theta_ft - theta_pre`` (the task vector) and a mask ``gamma``,
the *grafted* model is::

    theta_graft = theta_pre + gamma * tau

The paper finds a binary ``gamma`` over about 0.01% of the parameters that recovers most of the fine-tuned
accuracy and is better calibrated; masks of different tasks barely overlap.

Mask learning, as in the paper's code (``src/graft_trainer.py``):

1. ``gamma_base`` = the top ``sparsity`` fraction of ``|tau|`` over all maskable entries (one global
   ranking; embeddings and the output head are not maskable by default).
2. A real-valued ``S ~ U[0, 1)`` per entry and ``gamma(S) = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)``
   with ``b = 10`` (``sigmoid_bias``): inside the initial mask ``gamma = 1 - sigmoid(S - b)``, outside it
   ``gamma = sigmoid(S - b)``, so ``gamma`` starts within 5e-5 of ``gamma_base``.
3. ``steps`` plain gradient steps on ``S`` for the task loss of ``theta_pre + gamma(S) * tau``
   (``S <- S - lr * dL/dS``; the paper's ``lr`` is about 1e7 because ``sigmoid'(-10)`` is about 5e-5).
4. After every step the mask is rounded to binary and scored on held-out data; the best step is kept.

Here the sparsity is kept at its target by **projection**: the binary mask is the ``k = round(sparsity * N)``
entries with the largest ``gamma(S)`` (``keep_size=True``, the default), so learned, top-|tau| and random
masks are compared at exactly the same size. The paper's code has no penalty at all (its ``l1_reg`` is never
used) and rounds ``gamma`` at 0.5, so its mask size drifts with the number of steps; ``keep_size=False``
does that.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._validation import check_bool, check_float, check_int, check_option
from ..nn.view import ModelView, family_of
from ..tasks.base import Task, check_model_tokenizer

Mask = dict[str, torch.Tensor]  # parameter name (in the fine-tuned model) -> bool tensor of the parameter's shape
KINDS = ("learned", "top_delta", "random")


# ---------------------------------------------------------------------- pairing base and fine-tuned parameters
@dataclass
class _Pairing:
    """How each parameter of the fine-tuned model is grafted."""

    maskable: list[str]  # ft names, theta_pre + gamma * tau
    base_name: dict[str, str]  # ft name -> base name (for every parameter with a counterpart)
    kept_base: list[str]  # excluded (embeddings / head): pretrained value
    from_ft: list[str]  # no pretrained counterpart (a new head): fine-tuned value
    groups: dict[str, str]  # ft name -> "block" | "embeddings" | "head" | "new" | "other"


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        inner = [m for m in model.modules() if getattr(m, "config", None) is not None]
        config = inner[0].config if inner else None
    if config is None:
        raise TypeError(f"graft needs Hugging Face models (with a config); got {type(model).__name__}.")
    return getattr(config, "model_type", None)


def _pair(base: nn.Module, ft: nn.Module, include_embeddings: bool, include_head: bool) -> _Pairing:
    check_bool(include_embeddings, "include_embeddings", "graft")
    check_bool(include_head, "include_head", "graft")
    for name, model in (("base", base), ("ft", ft)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"The {name!r} parameter of graft must be a torch nn.Module. Got {type(model).__name__}.")
    type_base, type_ft = _model_type(base), _model_type(ft)
    family_of(type_ft)  # ValueError for an unsupported architecture
    if type_base != type_ft:
        raise ValueError(
            f"graft needs two models of the same architecture: the base is {type_base!r}, the fine-tuned model "
            f"{type_ft!r}. Pass the pretrained model that was fine-tuned."
        )
    base_params = dict(base.named_parameters())
    ft_params = dict(ft.named_parameters())
    # the fine-tuned model may wrap the base (EncoderClassifier(body) around a bare BertModel): find the prefix
    prefixes = [""] + [n + "." for n, m in ft.named_modules() if n and getattr(m, "config", None) is not None]
    best = max(prefixes, key=lambda p: sum(n.startswith(p) and n[len(p):] in base_params for n in ft_params))
    new_ids = {id(p) for p in ft.new_parameters()} if hasattr(ft, "new_parameters") else set()
    head = ft.get_output_embeddings() if hasattr(ft, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    embed_ids = {id(p) for m in ft.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    try:
        block_path = ModelView(ft).block_list_path + "."
    except (TypeError, ValueError):
        block_path = None

    pairing = _Pairing([], {}, [], [], {})
    unmatched = []
    for name, p in ft_params.items():
        base_name = name[len(best):] if name.startswith(best) else None
        has_base = base_name is not None and base_name in base_params
        if id(p) in new_ids or (not has_base and id(p) in head_ids):
            pairing.groups[name] = "new"
            pairing.from_ft.append(name)
            continue
        if not has_base:
            unmatched.append(name)
            continue
        if tuple(base_params[base_name].shape) != tuple(p.shape):
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(p.shape)} in the fine-tuned model but "
                f"{tuple(base_params[base_name].shape)} in the base: these are not the same architecture."
            )
        pairing.base_name[name] = base_name
        if id(p) in embed_ids or "embeddings" in name.split("."):
            group = "embeddings"  # token / position embeddings, BERT's embedding LayerNorm, a tied LM head
        elif id(p) in head_ids:
            group = "head"
        else:
            group = "block" if block_path and name.startswith(block_path) else "other"
        pairing.groups[name] = group
        wanted = (group == "embeddings" and include_embeddings) or (group == "head" and include_head) or group in ("block", "other")
        (pairing.maskable if wanted else pairing.kept_base).append(name)
    if unmatched:
        raise ValueError(
            f"The parameter names of the fine-tuned model do not match the base: {len(unmatched)} have no "
            f"counterpart, e.g. {unmatched[:3]} (base names look like {list(base_params)[:3]}). Pass the "
            "pretrained model the fine-tune started from, with the same architecture."
        )
    if not pairing.maskable:
        raise ValueError("graft found no maskable parameter (every parameter is an embedding, a head or new).")
    return pairing


# ---------------------------------------------------------------------- the grafting engine (shared by a sweep)
class _Grafter:
    """Holds ``theta_pre``, ``tau`` (flattened over the maskable entries) and the grafted model."""

    def __init__(self, base, ft, task, tok, include_embeddings, include_head, eval_n, device):
        if not isinstance(task, Task):
            raise TypeError(f"The 'task' parameter of graft must be an ftanalysis Task (fta.tasks.make). Got {type(task).__name__}.")
        task.check_tokenizer(tok)  # ValueError when the task's words are missing from the tokenizer
        check_model_tokenizer(ft, tok)
        self.pairing = _pair(base, ft, include_embeddings, include_head)
        self.task, self.tok, self.eval_n = task, tok, eval_n
        self.device = torch.device(device) if device is not None else next(ft.parameters()).device
        base_params = dict(base.named_parameters())
        self.model = copy.deepcopy(ft).to(self.device).eval()
        self.scores_ft = self.evaluate(self.model)  # the fine-tuned model itself, before any parameter is reset
        params = dict(self.model.named_parameters())
        self.names = self.pairing.maskable
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        with torch.no_grad():
            for name, base_name in self.pairing.base_name.items():
                if name not in self.names:  # excluded: back to the pretrained value
                    params[name].copy_(base_params[base_name])
            self.theta_pre = torch.cat([base_params[self.pairing.base_name[n]].detach().reshape(-1).float() for n in self.names]).to(self.device)
            theta_ft = torch.cat([params[n].detach().reshape(-1).float() for n in self.names]).to(self.device)
        self.tau = theta_ft - self.theta_pre  # [N]
        self.n = self.tau.numel()
        # the graft of every maskable entry (excluded parameters pretrained): it differs from the fine-tuned
        # model when the fine-tune moved the embeddings
        self.scores_full = self.evaluate(self.model_with(torch.ones(self.n, dtype=torch.bool, device=self.device)))
        self.scores_ref = self.evaluate(self.model_with(torch.zeros(self.n, dtype=torch.bool, device=self.device)))

    # -------------------------------------------------------------- masks as flat tensors
    def k_of(self, sparsity: float) -> int:
        return max(1, min(self.n, round(sparsity * self.n)))

    def top_delta(self, k: int) -> torch.Tensor:
        flat = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        flat[torch.topk(self.tau.abs(), k, sorted=False).indices] = True
        return flat

    def random(self, k: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        flat = torch.zeros(self.n, dtype=torch.bool)
        flat[torch.randperm(self.n, generator=generator)[:k]] = True
        return flat.to(self.device)

    def to_dict(self, flat: torch.Tensor) -> Mask:
        pieces = torch.split(flat.detach().cpu(), self.sizes)
        return {n: piece.reshape(shape).clone() for n, piece, shape in zip(self.names, pieces, self.shapes)}

    def from_dict(self, mask: Mask) -> torch.Tensor:
        if not isinstance(mask, dict):
            raise TypeError(f"A mask must be a dict of parameter name -> bool tensor. Got {type(mask).__name__}.")
        missing = [n for n in self.names if n not in mask]
        extra = [n for n in mask if n not in self.names]
        if missing or extra:
            raise ValueError(f"The mask does not cover the maskable parameters: missing {missing[:3]}, unexpected {extra[:3]}.")
        pieces = []
        for name, shape in zip(self.names, self.shapes):
            m = torch.as_tensor(mask[name])
            if tuple(m.shape) != tuple(shape):
                raise ValueError(f"mask[{name!r}] has shape {tuple(m.shape)}; the parameter has shape {tuple(shape)}.")
            pieces.append(m.reshape(-1).bool())
        return torch.cat(pieces).to(self.device)

    # -------------------------------------------------------------- grafted models
    @torch.no_grad()
    def model_with(self, flat_mask: torch.Tensor) -> nn.Module:
        """The grafted model (in place in ``self.model``): theta_pre + mask * tau."""
        theta = torch.where(flat_mask, self.theta_pre + self.tau, self.theta_pre)
        params = dict(self.model.named_parameters())
        for name, piece, shape in zip(self.names, torch.split(theta, self.sizes), self.shapes):
            params[name].copy_(piece.reshape(shape))
        return self.model

    def evaluate(self, model: nn.Module, split: str = "test", n: int | None = None) -> dict:
        scores = self.task.evaluate(model, self.tok, split=split, n=n or self.eval_n)
        return {"accuracy": scores["accuracy"], "loss": scores["loss"]}

    def soft_loss(self, gamma: torch.Tensor, batch: dict) -> torch.Tensor:
        theta = self.theta_pre + gamma * self.tau  # [N], differentiable in gamma
        params = {n: piece.reshape(shape) for n, piece, shape in zip(self.names, torch.split(theta, self.sizes), self.shapes)}
        logits = torch.func.functional_call(self.model, params, args=(), kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, strict=False).logits
        return self.task.loss(logits, batch)

    # -------------------------------------------------------------- mask learning
    def learn(self, k: int, steps: int, lr: float | None, seed: int, batch_size: int, sigmoid_bias: float,
              keep_size: bool, select_n: int, progress: bool) -> tuple[torch.Tensor, pd.DataFrame]:
        base_mask = self.top_delta(k)
        gamma_base = base_mask.float()
        generator = torch.Generator().manual_seed(seed)
        S = torch.rand(self.n, generator=generator).to(self.device)  # the paper's U[0, 1) initialisation

        def gamma_of(s: torch.Tensor) -> torch.Tensor:
            return gamma_base + (1 - 2 * gamma_base) * torch.sigmoid(s - sigmoid_bias)

        def binary(s: torch.Tensor) -> torch.Tensor:
            g = gamma_of(s)
            if not keep_size:
                return g > 0.5  # the paper's rounding: the size drifts
            flat = torch.zeros(self.n, dtype=torch.bool, device=self.device)
            flat[torch.topk(g, k, sorted=False).indices] = True  # projection onto masks of exactly k entries
            return flat

        def score(flat: torch.Tensor) -> dict:
            return self.evaluate(self.model_with(flat), split="val", n=select_n)

        best = base_mask
        best_score = score(base_mask)
        rows = [{"step": 0, "train_loss": float("nan"), "size": int(base_mask.sum()), "changed": 0, **{f"val_{k_}": v for k_, v in best_score.items()}}]
        for step in tqdm(range(steps), desc=f"graft k={k}", disable=not progress, leave=False):
            batch = self.task.batch(self.tok, batch_size, step=step, split="train", seed=seed, device=self.device)
            S_var = S.clone().requires_grad_(True)
            loss = self.soft_loss(gamma_of(S_var), batch)
            (grad,) = torch.autograd.grad(loss, S_var)
            if lr is None:  # scale so that the k-th strongest entry moves by one unit of S in this step
                kth = torch.topk(grad.abs(), k, sorted=False).values.min()
                lr = 1.0 / float(kth) if float(kth) > 0 else 1.0
            S = S - lr * grad
            flat = binary(S)
            current = score(flat)
            rows.append({"step": step + 1, "train_loss": float(loss.detach()), "size": int(flat.sum()),
                         "changed": int((flat != base_mask).sum()), **{f"val_{k_}": v for k_, v in current.items()}})
            if (current["accuracy"], -current["loss"]) > (best_score["accuracy"], -best_score["loss"]):
                best, best_score = flat, current
        return best, pd.DataFrame(rows)


# ---------------------------------------------------------------------- results
@dataclass
class GraftResult:
    """A grafted model and how well it recovers the fine-tuned model.

    Attributes
    ----------
    kind : str
        ``"learned"``, ``"top_delta"``, ``"random"`` or ``"given"``.
    mask : dict of str -> bool tensor
        The binary mask, per maskable parameter of the fine-tuned model (its names and shapes).
    model : nn.Module or None
        The grafted model ``theta_pre + mask * tau`` (None in a sweep unless ``keep_models=True``; rebuild it
        with :func:`apply_mask`).
    target_sparsity, sparsity : float
        Requested and achieved fraction of the maskable entries in the mask.
    n_selected, n_maskable : int
    scores : dict
        ``{"reference": ..., "fine-tuned": ..., "grafted": ..., "full graft": ...}``, each ``{"accuracy", "loss"}``
        on the task's test split. The reference is the empty graft: the pretrained model, plus the parameters in
        ``from_ft``. "fine-tuned" is the fine-tuned model itself; "full graft" grafts every maskable entry (it
        falls short of the fine-tuned model when the fine-tune also moved excluded parameters, e.g. embeddings).
    from_ft : list of str
        Parameters the pretrained model did not have (a new classifier head), taken whole from the fine-tuned
        model in every graft, the reference included.
    kept_base : list of str
        Excluded parameters (embeddings, the head) kept at their pretrained value.
    history : pandas.DataFrame
        Mask learning: per step, the training loss of the soft graft, the binary mask's size, how many entries
        differ from the initial top-|tau| mask, and its validation accuracy and loss (step 0 is the init).
    seconds : float
    """

    kind: str
    mask: Mask
    model: nn.Module | None
    target_sparsity: float
    sparsity: float
    n_selected: int
    n_maskable: int
    scores: dict
    from_ft: list[str]
    kept_base: list[str]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    seconds: float = 0.0

    @property
    def recovery(self) -> float:
        """Recovered fraction of the gain: ``(acc_graft - acc_ref) / (acc_ft - acc_ref)`` (NaN without a gain)."""
        ref, ft, g = (self.scores[k]["accuracy"] for k in ("reference", "fine-tuned", "grafted"))
        return (g - ref) / (ft - ref) if ft != ref else float("nan")

    @property
    def loss_recovery(self) -> float:
        """The same ratio for the test loss."""
        ref, ft, g = (self.scores[k]["loss"] for k in ("reference", "fine-tuned", "grafted"))
        return (ref - g) / (ref - ft) if ft != ref else float("nan")

    def summary(self) -> dict:
        return {
            "kind": self.kind, "target_sparsity": self.target_sparsity, "sparsity": self.sparsity,
            "n_selected": self.n_selected,
            **{f"{m}_{key}": self.scores[m][key] for m in ("reference", "fine-tuned", "grafted") for key in ("accuracy", "loss")},
            "recovery": self.recovery, "loss_recovery": self.loss_recovery, "seconds": round(self.seconds, 2),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per model (reference, fine-tuned, grafted): accuracy and loss, with the mask's kind and size."""
        rows = [{"model": m, **self.scores[m]} for m in ("reference", "fine-tuned", "grafted")]
        return pd.DataFrame(rows).assign(kind=self.kind, sparsity=self.sparsity, recovery=self.recovery)

    def profile(self, by: str | None = None) -> pd.DataFrame:
        """Where the mask lies (see :func:`mask_profile`)."""
        if self.model is None:
            raise ValueError("This result kept no model; call fta.probes.mask_profile(result.mask, ft_model).")
        return mask_profile(self.mask, self.model, by=by)

    def __repr__(self) -> str:
        return (f"GraftResult(kind={self.kind!r}, sparsity={self.sparsity:.2e}, recovery={self.recovery:.3f}, "
                f"grafted_accuracy={self.scores['grafted']['accuracy']:.3f}, from_ft={len(self.from_ft)} params)")


@dataclass
class GraftSweep:
    """Grafts over sparsities and mask kinds (see :func:`graft_sweep`)."""

    results: list[GraftResult]
    label: str = ""

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([r.summary() for r in self.results]).assign(label=self.label)

    def get(self, kind: str, sparsity: float) -> GraftResult:
        for r in self.results:
            if r.kind == kind and math.isclose(r.target_sparsity, sparsity, rel_tol=1e-9):
                return r
        raise KeyError(f"No {kind!r} graft at sparsity {sparsity} in this sweep.")

    def plot(self, ax=None, title: str = "") -> plt.Figure:
        """Recovered fraction of the gain against sparsity (log axis), one line per mask kind."""
        return plot_recovery([self], ax=ax, title=title)


def plot_recovery(sweeps, ax=None, title: str = "") -> plt.Figure:
    """Recovery against sparsity for one or more :class:`GraftSweep` (line style per sweep, colour per kind)."""
    sweeps = [sweeps] if isinstance(sweeps, GraftSweep) else list(sweeps)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
    else:
        fig = ax.figure
    colours = {"learned": "C0", "top_delta": "C1", "random": "C7", "given": "C3"}
    styles = ["-", "--", ":", "-."]
    for i, sweep in enumerate(sweeps):
        frame = sweep.to_frame()
        for kind, part in frame.groupby("kind", sort=False):
            part = part.sort_values("target_sparsity")
            label = f"{sweep.label}: {kind}" if sweep.label else kind
            ax.plot(part["target_sparsity"] * 100, part["recovery"], marker="o", ms=3, ls=styles[i % 4], color=colours.get(kind), label=label)
    ax.set_xscale("log")
    ax.axhline(1, color="grey", lw=0.8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("mask size (% of maskable parameters)")
    ax.set_ylabel("recovered fraction of the gain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- public entry points
def _check_common(sparsity, steps, seed, batch_size, eval_n, select_n, sigmoid_bias, lr, owner="graft"):
    sparsity = check_float(sparsity, "sparsity", owner, 0.0, 1.0, low_open=True)
    check_int(steps, "steps", owner, 0)
    check_int(seed, "seed", owner)
    check_int(batch_size, "batch_size", owner, 1)
    check_int(eval_n, "eval_n", owner, 1)
    check_int(select_n, "select_n", owner, 1)
    check_float(sigmoid_bias, "sigmoid_bias", owner, 0.0)
    if lr is not None:
        check_float(lr, "lr", owner, 0.0, low_open=True)
    return sparsity


def _result(grafter: _Grafter, kind: str, flat: torch.Tensor, sparsity: float, history, started: float, keep_model: bool) -> GraftResult:
    model = grafter.model_with(flat)
    scores = {"reference": grafter.scores_ref, "fine-tuned": grafter.scores_ft, "grafted": grafter.evaluate(model),
              "full graft": grafter.scores_full}
    n_selected = int(flat.sum())
    return GraftResult(
        kind=kind, mask=grafter.to_dict(flat), model=copy.deepcopy(model) if keep_model else None,
        target_sparsity=sparsity, sparsity=n_selected / grafter.n, n_selected=n_selected, n_maskable=grafter.n,
        scores=scores, from_ft=list(grafter.pairing.from_ft), kept_base=list(grafter.pairing.kept_base),
        history=history if history is not None else pd.DataFrame(), seconds=time.perf_counter() - started,
    )


def graft(
    base: nn.Module,
    ft: nn.Module,
    task: Task,
    tok,
    sparsity: float = 0.01,
    steps: int = 10,
    lr: float | None = None,
    seed: int = 0,
    *,
    batch_size: int = 64,
    sigmoid_bias: float = 10.0,
    keep_size: bool = True,
    include_embeddings: bool = False,
    include_head: bool = False,
    eval_n: int = 512,
    select_n: int = 256,
    device=None,
    progress: bool = False,
) -> GraftResult:
    """Learn a sparse binary mask over ``tau = theta_ft - theta_pre`` and graft it onto the pretrained model.

    Panigrahi et al. 2023 (arXiv 2302.06600): ``theta_graft = theta_pre + gamma * tau`` with
    ``gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)``, ``gamma_base`` the top-``sparsity``
    fraction of ``|tau|`` (global ranking), ``S ~ U[0, 1)``, ``b = sigmoid_bias``; ``steps`` gradient steps
    ``S <- S - lr * dL/dS`` on the task loss; the mask is rounded to binary for evaluation and the step with
    the best validation accuracy is kept (step 0, the top-|tau| mask, included). See the module docstring
    for how the sparsity is kept at its target.

    Parameters
    ----------
    base : nn.Module
        The pretrained model the fine-tune started from (a bare encoder is fine when ``ft`` wraps it, e.g.
        ``fta.zoo.EncoderClassifier(body)``).
    ft : nn.Module
        The fine-tuned model (a plain model, e.g. ``FinetuneResult.merged_model()``). Not modified.
    task : Task
        Its ``train`` split drives the mask learning, ``val`` selects the step, ``test`` scores the models.
    tok : tokenizer of both models.
    sparsity : float in (0, 1], default=0.01
        Mask size as a fraction of the maskable entries. The paper's 0.01% is for 125M-parameter models.
    steps : int, default=10
        Gradient steps on ``S``; 0 gives the top-|tau| mask without optimisation (the paper's code uses
        10-100 steps, each averaging up to 128 batches).
    lr : float, optional
        Step size on ``S``. Default: chosen at the first step so that the ``k``-th largest ``|dL/dS|`` moves
        ``S`` by 1 (the paper's fixed ``1e7`` depends on the scale of ``tau``).
    seed : int, default=0
        Seeds ``S``'s initialisation and the training batches.
    batch_size : int, default=64
        Training examples per step.
    sigmoid_bias : float, default=10.0
        ``b`` in ``sigmoid(S - b)`` (the paper's code).
    keep_size : bool, default=True
        True: the binary mask is the ``k`` entries with the largest ``gamma`` (size fixed at the target).
        False: the paper's ``round(gamma)``, whose size may drift.
    include_embeddings, include_head : bool, default=False
        Make the embeddings (and BERT's embedding LayerNorm) or the output head maskable. Excluded ones keep
        their pretrained value. A head the pretrained model did not have (``ft.new_parameters()``, or no
        counterpart in ``base``) is always taken from ``ft``; ``result.from_ft`` lists it.
    eval_n, select_n : int, default=512, 256
        Test examples for the reported scores; validation examples for picking the best step.
    device : optional
        Default: the fine-tuned model's device.
    progress : bool, default=False

    Returns
    -------
    GraftResult

    Raises
    ------
    ValueError
        ``sparsity`` outside (0, 1]; models of different architectures or with parameter names that do not
        match; a task whose words the tokenizer cannot write or whose ids the model lacks.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> body, tok = fta.zoo.load("minilm")                                             # doctest: +SKIP
    >>> clf = fta.zoo.EncoderClassifier(body, 2, seed=0)                               # doctest: +SKIP
    >>> task = fta.tasks.make("sentiment_negation")                                    # doctest: +SKIP
    >>> ft, _ = fta.cached_finetune("minilm+head2(seed=0)", clf, tok, task, fta.methods.Full(),
    ...                             steps=300, lr=5e-5, batch_size=32, seed=0)         # doctest: +SKIP
    >>> result = fta.probes.graft(body, ft, task, tok, sparsity=0.01)                  # doctest: +SKIP
    >>> result.recovery, result.from_ft                                                # doctest: +SKIP
    """
    started = time.perf_counter()
    sparsity = _check_common(sparsity, steps, seed, batch_size, eval_n, select_n, sigmoid_bias, lr)
    for flag, value in (("keep_size", keep_size), ("progress", progress)):
        check_bool(value, flag, "graft")
    grafter = _Grafter(base, ft, task, tok, include_embeddings, include_head, eval_n, device)
    k = grafter.k_of(sparsity)
    if steps == 0:
        return _result(grafter, "top_delta", grafter.top_delta(k), sparsity, None, started, keep_model=True)
    flat, history = grafter.learn(k, steps, lr, seed, batch_size, sigmoid_bias, keep_size, select_n, progress)
    return _result(grafter, "learned", flat, sparsity, history, started, keep_model=True)


def graft_sweep(
    base: nn.Module,
    ft: nn.Module,
    task: Task,
    tok,
    sparsities=(1e-4, 1e-3, 1e-2, 5e-2, 1e-1),
    kinds=KINDS,
    steps: int = 10,
    lr: float | None = None,
    seed: int = 0,
    *,
    batch_size: int = 64,
    sigmoid_bias: float = 10.0,
    keep_size: bool = True,
    include_embeddings: bool = False,
    include_head: bool = False,
    eval_n: int = 512,
    select_n: int = 256,
    keep_models: bool = False,
    label: str = "",
    device=None,
    progress: bool = True,
) -> GraftSweep:
    """Graft at several sparsities with learned, top-|tau| and random masks (same size at each sparsity).

    One preparation (``tau``, the reference and fine-tuned scores) serves the whole sweep. Arguments as in
    :func:`graft`; ``kinds`` is any subset of ``("learned", "top_delta", "random")``; the random masks are
    drawn uniformly over the maskable entries with ``seed``. ``keep_models=False`` keeps only the masks.

    Returns
    -------
    GraftSweep
        ``.to_frame()`` has one row per (kind, sparsity) with ``recovery``; ``.plot()`` draws the curves.
    """
    started = time.perf_counter()
    for flag, value in (("keep_size", keep_size), ("keep_models", keep_models), ("progress", progress)):
        check_bool(value, flag, "graft_sweep")
    sparsities = [_check_common(s, steps, seed, batch_size, eval_n, select_n, sigmoid_bias, lr, "graft_sweep") for s in sparsities]
    if not sparsities:
        raise ValueError("The 'sparsities' parameter of graft_sweep must hold at least one value in (0, 1].")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        check_option(kind, "kinds", "graft_sweep", KINDS)
    grafter = _Grafter(base, ft, task, tok, include_embeddings, include_head, eval_n, device)
    results = []
    for sparsity in tqdm(sparsities, desc="graft sweep", disable=not progress, leave=False):
        k = grafter.k_of(sparsity)
        for kind in kinds:
            t0 = time.perf_counter()
            history = None
            if kind == "learned":
                flat, history = grafter.learn(k, steps, lr, seed, batch_size, sigmoid_bias, keep_size, select_n, False)
            elif kind == "top_delta":
                flat = grafter.top_delta(k)
            else:
                flat = grafter.random(k, seed)
            results.append(_result(grafter, kind, flat, sparsity, history, t0, keep_model=keep_models))
    del started
    return GraftSweep(results=results, label=label)


def _grafter_for_masks(base, ft, include_embeddings, include_head):
    """A light grafter (no task) for building masks and models."""
    grafter = _Grafter.__new__(_Grafter)
    grafter.pairing = _pair(base, ft, include_embeddings, include_head)
    base_params, params = dict(base.named_parameters()), dict(ft.named_parameters())
    grafter.names = grafter.pairing.maskable
    grafter.shapes = [params[n].shape for n in grafter.names]
    grafter.sizes = [params[n].numel() for n in grafter.names]
    grafter.device = next(ft.parameters()).device
    with torch.no_grad():
        grafter.theta_pre = torch.cat([base_params[grafter.pairing.base_name[n]].detach().reshape(-1).float().to(grafter.device) for n in grafter.names])
        grafter.tau = torch.cat([params[n].detach().reshape(-1).float() for n in grafter.names]) - grafter.theta_pre
    grafter.n = grafter.tau.numel()
    return grafter


def top_delta_mask(base: nn.Module, ft: nn.Module, sparsity: float, *, include_embeddings: bool = False, include_head: bool = False) -> Mask:
    """The top-``sparsity`` fraction of ``|theta_ft - theta_pre|`` over the maskable entries (one global ranking).

    The size is exactly ``max(1, round(sparsity * N))``; ties are broken arbitrarily.
    """
    sparsity = check_float(sparsity, "sparsity", "top_delta_mask", 0.0, 1.0, low_open=True)
    g = _grafter_for_masks(base, ft, include_embeddings, include_head)
    return g.to_dict(g.top_delta(g.k_of(sparsity)))


def random_mask(base: nn.Module, ft: nn.Module, sparsity: float, seed: int = 0, *, include_embeddings: bool = False, include_head: bool = False) -> Mask:
    """A uniformly random mask of ``max(1, round(sparsity * N))`` maskable entries (seeded)."""
    sparsity = check_float(sparsity, "sparsity", "random_mask", 0.0, 1.0, low_open=True)
    check_int(seed, "seed", "random_mask")
    g = _grafter_for_masks(base, ft, include_embeddings, include_head)
    return g.to_dict(g.random(g.k_of(sparsity), seed))


def apply_mask(base: nn.Module, ft: nn.Module, mask: Mask, *, include_embeddings: bool = False, include_head: bool = False) -> nn.Module:
    """A new grafted model ``theta_pre + mask * tau`` (excluded parameters pretrained, new ones fine-tuned).

    ``mask`` must cover exactly the maskable parameters for these ``include_*`` settings (e.g. a
    :attr:`GraftResult.mask`). Neither model is modified.
    """
    g = _grafter_for_masks(base, ft, include_embeddings, include_head)
    base_params = dict(base.named_parameters())
    g.model = copy.deepcopy(ft).eval()
    params = dict(g.model.named_parameters())
    with torch.no_grad():
        for name in g.pairing.kept_base:
            params[name].copy_(base_params[g.pairing.base_name[name]])
    return g.model_with(g.from_dict(mask))


def evaluate_mask(base: nn.Module, ft: nn.Module, mask: Mask, task: Task, tok, *, include_embeddings: bool = False,
                  include_head: bool = False, eval_n: int = 512, kind: str = "given") -> GraftResult:
    """Score a given binary mask (e.g. one learned for another task) as a :class:`GraftResult`."""
    started = time.perf_counter()
    check_int(eval_n, "eval_n", "evaluate_mask", 1)
    grafter = _Grafter(base, ft, task, tok, include_embeddings, include_head, eval_n, None)
    flat = grafter.from_dict(mask)
    return _result(grafter, kind, flat, float(flat.float().mean()), None, started, keep_model=True)


# ---------------------------------------------------------------------- mask analysis
def _flat(mask) -> torch.Tensor:
    if isinstance(mask, GraftResult):
        mask = mask.mask
    if isinstance(mask, dict):
        return torch.cat([torch.as_tensor(mask[k]).reshape(-1).bool().cpu() for k in sorted(mask)])
    if isinstance(mask, torch.Tensor):
        return mask.reshape(-1).bool().cpu()
    raise TypeError(f"A mask must be a dict of bool tensors, a bool tensor or a GraftResult. Got {type(mask).__name__}.")


def _check_same_support(a, b) -> None:
    if isinstance(a, GraftResult):
        a = a.mask
    if isinstance(b, GraftResult):
        b = b.mask
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise ValueError(f"The two masks cover different parameters: {sorted(set(a) ^ set(b))[:3]}.")
        for k in a:
            if tuple(a[k].shape) != tuple(b[k].shape):
                raise ValueError(f"The two masks disagree on the shape of {k!r}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}.")


def jaccard(a, b) -> float:
    """``|a & b| / |a | b|`` of two masks over the same parameters (1.0 for two empty masks)."""
    _check_same_support(a, b)
    fa, fb = _flat(a), _flat(b)
    if fa.shape != fb.shape:
        raise ValueError(f"The two masks have {fa.numel()} and {fb.numel()} entries; they must cover the same parameters.")
    union = int((fa | fb).sum())
    return int((fa & fb).sum()) / union if union else 1.0


def chance_jaccard(k_a: int, k_b: int, n: int) -> float:
    """Expected Jaccard index of two independent uniformly random masks of sizes ``k_a`` and ``k_b`` out of ``n``.

    The intersection ``I`` is hypergeometric (``n`` entries, ``k_a`` marked, ``k_b`` drawn), and
    ``E[J] = sum_i P(I = i) * i / (k_a + k_b - i)``, computed exactly in float64 (about ``k_a k_b / n`` over
    ``k_a + k_b - k_a k_b / n`` when the masks are large).
    """
    n = check_int(n, "n", "chance_jaccard", 1)
    k_a = check_int(k_a, "k_a", "chance_jaccard", 0, n)
    k_b = check_int(k_b, "k_b", "chance_jaccard", 0, n)
    if k_a == 0 and k_b == 0:
        return 1.0
    lo, hi = max(0, k_a + k_b - n), min(k_a, k_b)
    i = torch.arange(lo, hi + 1, dtype=torch.float64)

    def log_choose(a, b):
        return torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)

    ka, kb, nn_ = (torch.tensor(float(v), dtype=torch.float64) for v in (k_a, k_b, n))
    log_p = log_choose(ka, i) + log_choose(nn_ - ka, kb - i) - log_choose(nn_, kb)
    p = torch.exp(log_p - torch.logsumexp(log_p, 0))  # renormalised against rounding
    return float((p * i / (k_a + k_b - i)).sum())


def mask_overlap(masks: dict, similarity=None) -> pd.DataFrame:
    """Pairwise overlap of named masks, each against its chance level.

    Parameters
    ----------
    masks : dict of name -> mask (dict of bool tensors, flat bool tensor or GraftResult)
        All over the same parameters.
    similarity : dict of (name_a, name_b) -> float, optional
        A similarity of the two tasks (e.g. :func:`delta_cosine` of their task vectors), added as a column
        so that overlap can be read against task similarity.

    Returns
    -------
    pandas.DataFrame
        One row per pair: ``size_a``, ``size_b``, ``intersection``, ``jaccard``, ``chance_jaccard``,
        ``jaccard_ratio`` (observed / chance), ``overlap`` = ``|a & b| / min(|a|, |b|)`` (the paper's
        measure) and ``chance_overlap`` = ``max(|a|, |b|) / n``, and ``similarity`` when given.
    """
    if not isinstance(masks, dict) or len(masks) < 2:
        raise ValueError("The 'masks' parameter of mask_overlap must be a dict of at least two named masks.")
    names = list(masks)
    flats = {k: _flat(v) for k, v in masks.items()}
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            _check_same_support(masks[a], masks[b])
            fa, fb = flats[a], flats[b]
            if fa.shape != fb.shape:
                raise ValueError(f"Masks {a!r} and {b!r} cover different numbers of entries ({fa.numel()} vs {fb.numel()}).")
            n, ka, kb, inter = fa.numel(), int(fa.sum()), int(fb.sum()), int((fa & fb).sum())
            jac = jaccard(fa, fb)
            chance = chance_jaccard(ka, kb, n)
            row = {"a": a, "b": b, "size_a": ka, "size_b": kb, "intersection": inter, "jaccard": jac, "chance_jaccard": chance,
                   "jaccard_ratio": jac / chance if chance > 0 else float("nan"),
                   "overlap": inter / max(1, min(ka, kb)), "chance_overlap": max(ka, kb) / n}
            if similarity is not None:
                row["similarity"] = similarity.get((a, b), similarity.get((b, a), float("nan")))
            rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def delta_cosine(base: nn.Module, ft_a: nn.Module, ft_b: nn.Module, *, include_embeddings: bool = False, include_head: bool = False) -> float:
    """Cosine similarity of two task vectors ``tau_a``, ``tau_b`` over the maskable parameters (a task similarity)."""
    ta = _grafter_for_masks(base, ft_a, include_embeddings, include_head)
    tb = _grafter_for_masks(base, ft_b, include_embeddings, include_head)
    if ta.names != tb.names:
        raise ValueError("The two fine-tuned models have different maskable parameters; they must share one architecture.")
    return float(torch.nn.functional.cosine_similarity(ta.tau, tb.tau, dim=0))


def _module_kinds(model: nn.Module) -> tuple[str | None, dict[str, list[str]]]:
    try:
        view = ModelView(model)
    except (TypeError, ValueError):
        return None, {}
    kinds: dict[str, list[str]] = {}
    for name in view.matrix_names():
        ref = view.ref(name)
        suffix = ref.module_path[len(f"{view.block_list_path}.{ref.layer}."):]
        kinds.setdefault(suffix, [])
        if ref.kind not in kinds[suffix]:
            kinds[suffix].append(ref.kind)
    return view.block_list_path, kinds


def mask_profile(mask, model: nn.Module, by: str | None = None) -> pd.DataFrame:
    """Where a mask lies: its entries per layer and per module type.

    Parameters
    ----------
    mask : dict of name -> bool tensor, or GraftResult
        Names as in ``model`` (the fine-tuned or grafted model).
    model : nn.Module
        Gives the layer structure. GPT-2's fused ``c_attn`` is split into q, k and v (by output columns).
    by : {None, "layer", "module"}, default=None
        None: one row per (layer, module); otherwise summed over the other axis.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer`` (-1 outside the blocks), ``module`` (``attn.q`` ... ``mlp.down``, ``norm``,
        ``other``, or ``embeddings`` / ``head`` / ``final`` outside the blocks), ``selected``, ``total``,
        ``share`` (of the mask's entries) and ``density`` (selected / total).
    """
    check_option(by, "by", "mask_profile", (None, "layer", "module"))
    if isinstance(mask, GraftResult):
        mask = mask.mask
    if not isinstance(mask, dict):
        raise TypeError(f"mask_profile needs a dict of parameter name -> bool tensor. Got {type(mask).__name__}.")
    params = dict(model.named_parameters())
    unknown = [n for n in mask if n not in params]
    if unknown:
        raise ValueError(f"mask_profile: {unknown[:3]} are not parameters of the given model (names look like {list(params)[:3]}).")
    block_path, kinds = _module_kinds(model)
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n for n, p in params.items() if isinstance(head, nn.Module) and any(p is q for q in head.parameters())}
    counts: dict[tuple[int, str], list[int]] = {}

    def add(layer, module, selected, total):
        entry = counts.setdefault((layer, module), [0, 0])
        entry[0] += selected
        entry[1] += total

    for name, m in mask.items():
        m = torch.as_tensor(m).bool()
        module_path, _, pname = name.rpartition(".")
        if block_path and name.startswith(block_path + "."):
            rest = name[len(block_path) + 1:]
            layer_str, _, inner = rest.partition(".")
            layer, inner_path = int(layer_str), inner.rpartition(".")[0]
            found = kinds.get(inner_path)
            if found and len(found) > 1:  # fused q/k/v: Conv1D weight (in, 3d) / bias (3d): split the output axis
                axis = m.ndim - 1
                for kind, part in zip(found, torch.chunk(m, len(found), dim=axis)):
                    add(layer, kind, int(part.sum()), part.numel())
                continue
            if found:
                module = found[0]
            else:
                module = "norm" if "norm" in type(modules.get(module_path)).__name__.lower() else "other"
            add(layer, module, int(m.sum()), m.numel())
        else:
            lowered = name.lower()
            if "embed" in lowered or "wte" in lowered or "wpe" in lowered:
                module = "embeddings"
            else:
                module = "head" if name in head_names else "final"
            add(-1, module, int(m.sum()), m.numel())
    frame = pd.DataFrame([{"layer": k[0], "module": k[1], "selected": v[0], "total": v[1]} for k, v in counts.items()])
    if by is not None:
        frame = frame.groupby(by, as_index=False)[["selected", "total"]].sum()
    total_selected = max(1, int(frame["selected"].sum()))
    frame["share"] = frame["selected"] / total_selected
    frame["density"] = frame["selected"] / frame["total"].clip(lower=1)
    return frame.sort_values([c for c in ("layer", "module") if c in frame]).reset_index(drop=True)


__all__ = [
    "GraftResult", "GraftSweep", "apply_mask", "chance_jaccard", "delta_cosine", "evaluate_mask", "graft", "graft_sweep",
    "jaccard", "mask_overlap", "mask_profile", "plot_recovery", "random_mask", "top_delta_mask",
]
