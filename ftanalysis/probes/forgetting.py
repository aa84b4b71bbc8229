"""What fine-tuning forgot, and whether it is really gone: retention, probes, pruning and reverse fine-tuning.

Jain, Kirk, Lubana, Dick, Tanaka, Grefenstette, Rocktaschel, Krueger 2024, "Mechanistically analyzing the
effects of fine-tuning on procedurally defined tasks" (ICLR 2024, arXiv 2311.12786) argue that fine-tuning
often learns a thin *wrapper* on top of a capability that survives underneath. Their three tests, and the
plain retention measure they are checked against:

- :func:`retention`: accuracy and loss on the held-out pretraining mix, per task, against the base model.
- :func:`probe_layers`: a linear probe per layer (multinomial logistic regression on the pooled residual
  stream, fitted on train prompts, scored on test prompts) reads an old capability's answer.
- :func:`prune_neurons`: one-shot removal of the MLP neurons with the largest first-order effect on a loss
  (grad x weight); returns the pruned copy.
- :func:`reverse_finetune`: fine-tune back on the old task and report the steps needed to reach a target
  accuracy (compare with the same budget from a control start, e.g. a model that never had the capability).
"""

from __future__ import annotations

import copy as copy_module
import math
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._validation import check_float, check_int, check_option
from ..nn.view import ModelView
from ..tasks.base import Task, collate
from ..tasks.mixture import Mixture, PretrainingMix
from .similarity import POOLINGS, layer_representations


# ---------------------------------------------------------------------- retention
@dataclass
class RetentionResult:
    """Per-task accuracy and loss of a model (and its base) on the held-out pretraining mix."""

    frame: pd.DataFrame

    @property
    def mean_accuracy(self) -> float:
        return float(self.frame["accuracy"].mean())

    @property
    def mean_retained(self) -> float:
        """Mean over tasks of accuracy / base accuracy (NaN without a base)."""
        return float(self.frame["retained"].mean()) if "retained" in self.frame else float("nan")

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def plot(self, ax=None):
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3))
        f = self.frame
        x = range(len(f))
        if "base_accuracy" in f:
            ax.bar([i - 0.2 for i in x], f["base_accuracy"], width=0.4, label="base", color="0.7")
        ax.bar([i + 0.2 for i in x], f["accuracy"], width=0.4, label="model", color="C0")
        ax.set_xticks(list(x), f["task"], rotation=30, ha="right")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend(frameon=False)
        fig.tight_layout()
        return fig


def retention(model, tok, base=None, task: Task | None = None, n: int = 256, split: str = "test") -> RetentionResult:
    """Accuracy and loss per task of the held-out pretraining mix (or any task), against ``base`` if given.

    Parameters
    ----------
    model, tok : the (fine-tuned) causal LM and its tokenizer.
    base : the pretrained model, optional. Adds ``base_accuracy``, ``base_loss``, ``retained`` (accuracy /
        base accuracy) and ``loss_increase`` (nats per answer token) columns.
    task : Task, default=``fta.tasks.make("pretraining_mix")``
        A :class:`~ftanalysis.tasks.Mixture` is scored per component; any other task gives one row.
    n : int, default=256
        Test examples per task.
    """
    task = PretrainingMix() if task is None else task
    if not isinstance(task, Task):
        raise TypeError(f"The 'task' parameter of retention must be a Task. Got {type(task).__name__}.")
    for name, value in (("model", model), ("base", base)):
        if value is not None and not isinstance(value, torch.nn.Module):
            raise TypeError(f"The {name!r} parameter of retention must be a torch nn.Module (load it with fta.load_model). Got {type(value).__name__}.")
    check_int(n, "n", "retention", 1)

    def scores(m) -> list[dict]:
        if isinstance(task, Mixture):
            out = task.evaluate(m, tok, split=split, n=n)
            return [{"task": t.name, "accuracy": out[f"{t.name}/accuracy"], "loss": out[f"{t.name}/loss"]} for t in task.tasks]
        out = task.evaluate(m, tok, split=split, n=n)
        return [{"task": task.name, "accuracy": out["accuracy"], "loss": out["loss"]}]

    frame = pd.DataFrame(scores(model))
    if base is not None:
        b = pd.DataFrame(scores(base))
        frame["base_accuracy"] = b["accuracy"].to_numpy()
        frame["base_loss"] = b["loss"].to_numpy()
        frame["retained"] = frame["accuracy"] / frame["base_accuracy"].where(frame["base_accuracy"] > 0)
        frame["loss_increase"] = frame["loss"] - frame["base_loss"]
    return RetentionResult(frame=frame)


# ---------------------------------------------------------------------- linear probes per layer
def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, max_iter: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: ``(W [classes, d], b [classes])``.

    Minimises mean cross-entropy + ``l2 * ||W||^2``; weights start from a seeded small normal draw.
    """
    owner = "fit_logistic"
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise TypeError(f"The 'x' parameter of {owner} must be a float tensor [n, d]. Got {getattr(x, 'shape', type(x).__name__)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"The 'x' parameter of {owner} has NaN or infinite entries; a probe needs finite features.")
    check_int(n_classes, "n_classes", owner, 2)
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"The 'y' parameter of {owner} must be an integer tensor [n] with n = {x.shape[0]}. Got {getattr(y, 'shape', type(y).__name__)}.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"The 'y' parameter of {owner} holds labels in [{int(y.min())}, {int(y.max())}]; they must be in [0, n_classes - 1] = [0, {n_classes - 1}].")
    check_float(l2, "l2", owner, 0.0)
    check_int(max_iter, "max_iter", owner, 1)
    generator = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(n_classes, x.shape[1], generator=generator, dtype=x.dtype)).requires_grad_(True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


@dataclass
class LayerProbeResult:
    """Linear-probe accuracy per layer (0 = embeddings, l = after block l - 1), with the fitted probes."""

    frame: pd.DataFrame
    classes: list[str]
    probes_: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=list)

    @property
    def best_test_accuracy(self) -> float:
        return float(self.frame["test_accuracy"].max())

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def plot(self, ax=None, label: str | None = None):
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 3))
        f = self.frame
        ax.plot(f["layer"], f["test_accuracy"], "o-", label=label)
        ax.axhline(float(f["chance"].iloc[0]), color="0.6", ls=":", lw=1)
        ax.set_xticks(list(f["layer"]), ["emb"] + [str(i) for i in range(len(f) - 1)])
        ax.set_xlabel("layer (residual stream after block)")
        ax.set_ylabel("probe test accuracy")
        ax.set_ylim(0, 1.05)
        if label:
            ax.legend(frameon=False)
        fig.tight_layout()
        return fig


def probe_layers(
    model,
    tok,
    task: Task,
    n_train: int = 512,
    n_test: int = 256,
    pooling: str = "last",
    l2: float = 1e-3,
    max_iter: int = 200,
    seed: int = 0,
    shuffle_labels: bool = False,
) -> LayerProbeResult:
    """Fit a linear probe per layer that predicts ``task``'s answer from the pooled residual stream.

    Probes are fitted on the first ``n_train`` ``train`` examples and scored on the first ``n_test`` ``test``
    examples (features standardised with the train statistics). The answer strings are the classes.

    Parameters
    ----------
    model, tok : any model ``fta.nn.ModelView`` supports, and its tokenizer. Not modified.
    task : Task
        Its prompts are read and its answers are the labels (e.g. ``counting(token="a")`` to read the old
        count from a model fine-tuned to count "b").
    pooling : {"last", "mean"}, default="last"
        The last prompt token (where an LM predicts the answer) or the mean over tokens.
    l2 : float, default=1e-3
        Ridge penalty on the probe weights.
    seed : int, default=0
        Seeds the probe initialisation (and the label permutation of the control).
    shuffle_labels : bool, default=False
        Control: fit on randomly permuted train labels (test accuracy should fall to chance).
    """
    check_option(pooling, "pooling", "probe_layers", POOLINGS)
    check_int(n_train, "n_train", "probe_layers", 2)
    check_int(n_test, "n_test", "probe_layers", 1)
    check_float(l2, "l2", "probe_layers", 0.0)
    train = task.examples(n_train, "train")
    test = task.examples(n_test, "test")
    classes = sorted({e.answer for e in train + test})
    index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([index[e.answer] for e in train])
    y_test = torch.tensor([index[e.answer] for e in test])
    if shuffle_labels:
        y_train = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))]
    rep_train = layer_representations(model, tok, train, pooling=pooling).double()  # [layers + 1, n_train, d]
    rep_test = layer_representations(model, tok, test, pooling=pooling).double()
    majority = float((y_test == torch.bincount(y_train, minlength=len(classes)).argmax()).float().mean())
    rows, probes = [], []
    for layer in range(rep_train.shape[0]):
        mean, std = rep_train[layer].mean(0), rep_train[layer].std(0).clamp_min(1e-6)
        x_train, x_test = (rep_train[layer] - mean) / std, (rep_test[layer] - mean) / std
        w, b = fit_logistic(x_train, y_train, len(classes), l2=l2, max_iter=max_iter, seed=seed)
        probes.append((w, b))
        rows.append({
            "layer": layer,
            "train_accuracy": float(((x_train @ w.T + b).argmax(1) == y_train).float().mean()),
            "test_accuracy": float(((x_test @ w.T + b).argmax(1) == y_test).float().mean()),
            "chance": majority,
        })
    return LayerProbeResult(frame=pd.DataFrame(rows), classes=classes, probes_=probes)


# ---------------------------------------------------------------------- pruning
@dataclass
class PruneResult:
    """The pruned copy, the removed neurons and every neuron's score."""

    model: torch.nn.Module
    pruned: pd.DataFrame
    scores: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.pruned.copy()


def neuron_scores(model, tok, task: Task, n: int = 256, batch_size: int = 64, split: str = "train") -> pd.DataFrame:
    """First-order effect of removing each MLP neuron on ``task``'s loss, by grad x weight.

    Neuron ``j`` of block ``l`` writes to the residual stream through column ``j`` of ``layers.{l}.mlp.down``
    (``(out, in)`` orientation). Zeroing that column removes the neuron exactly, and to first order changes the
    loss by ``delta_L_j = -sum_i g_ij W_ij`` (the gradient g of the mean loss over ``n`` examples). Because
    ``dL/dW_ij = sum_tokens dL/dout_i * a_j``, this equals minus the activation x gradient score of Molchanov
    et al. 2017 summed over tokens. Returns one row per neuron: ``layer``, ``neuron``, ``delta_loss``.
    """
    view = ModelView(model)
    names = view.matrix_names("mlp.down")
    params = {name: view.module(name).weight for name in names}
    was_training = model.training
    model.eval()
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    device = next(model.parameters()).device
    examples = task.examples(n, split)
    try:
        for start in range(0, n, batch_size):
            chunk = examples[start : start + batch_size]
            batch = task.collate(chunk, tok, device=device) if task.kind == "classification" else collate(chunk, tok, device=device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = task.loss(logits, batch) * len(chunk) / n
            loss.backward()
        rows = []
        for name in names:
            ref = view.ref(name)
            grad = ref.to_canonical(params[name].grad)  # (d_model, d_mlp)
            weight = view.get(name)
            delta = -(grad * weight).sum(0)  # [d_mlp]: predicted loss change when neuron j is removed
            rows += [{"layer": ref.layer, "neuron": j, "delta_loss": float(d)} for j, d in enumerate(delta)]
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return pd.DataFrame(rows)


@torch.no_grad()
def remove_neurons(model, neurons: list[tuple[int, int]]) -> torch.nn.Module:
    """A copy of ``model`` with MLP neurons ``[(layer, neuron), ...]`` removed (their down-projection column zeroed)."""
    pruned = copy_module.deepcopy(model)
    view = ModelView(pruned)
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(int(layer), []).append(int(neuron))
    for layer, columns in by_layer.items():
        name = f"layers.{layer}.mlp.down"
        weight = view.get(name)
        if max(columns) >= weight.shape[1]:
            raise ValueError(f"Neuron index {max(columns)} out of range for {name} with {weight.shape[1]} neurons.")
        weight[:, columns] = 0.0
        view.set(name, weight)
    return pruned


def prune_neurons(
    model,
    tok,
    task: Task,
    k: int = 10,
    criterion: str = "decrease",
    n: int = 256,
    batch_size: int = 64,
    split: str = "train",
    seed: int = 0,
) -> PruneResult:
    """One-shot pruning of the ``k`` MLP neurons with the largest grad x weight effect on ``task``'s loss.

    Jain et al. 2024 prune a handful of neurons (5-15 in their PCFG models) by grad x weight and find that
    the pre-fine-tuning behaviour returns. Scores come from :func:`neuron_scores` (``delta_loss``: predicted
    change of the loss when the neuron is removed).

    Parameters
    ----------
    model, tok : the model to prune (not modified) and its tokenizer.
    task : Task whose loss is scored: the old task with ``criterion="decrease"`` (remove the neurons whose
        removal most lowers the old task's loss, i.e. the "wrapper" that suppresses it), or the fine-tuning
        task with ``criterion="importance"`` (remove the neurons it relies on most).
    k : int, default=10
    criterion : {"decrease", "importance", "random"}, default="decrease"
        ``"decrease"``: most negative ``delta_loss``; ``"importance"``: largest ``|delta_loss|``; ``"random"``:
        ``k`` neurons drawn with ``seed`` (the control).
    n, batch_size, split : the examples the gradient is taken over.
    """
    check_int(k, "k", "prune_neurons", 0)
    check_option(criterion, "criterion", "prune_neurons", ("decrease", "importance", "random"))
    scores = neuron_scores(model, tok, task, n=n, batch_size=batch_size, split=split)
    if k > len(scores):
        raise ValueError(f"The 'k' parameter of prune_neurons must be at most the number of MLP neurons ({len(scores)}). Got {k}.")
    if criterion == "random":
        order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))[:k].tolist()
        chosen = scores.iloc[order]
    elif criterion == "decrease":
        chosen = scores.nsmallest(k, "delta_loss")
    else:
        chosen = scores.loc[scores["delta_loss"].abs().nlargest(k).index]
    pruned = remove_neurons(model, list(zip(chosen["layer"], chosen["neuron"])))
    return PruneResult(model=pruned, pruned=chosen.reset_index(drop=True), scores=scores)


# ---------------------------------------------------------------------- reverse fine-tuning
@dataclass
class ReverseFinetuneResult:
    """Steps of fine-tuning on the old task until validation accuracy first reached ``target``."""

    steps_to_target: int | None
    target: float
    history: pd.DataFrame
    model: torch.nn.Module = field(repr=False)

    @property
    def reached(self) -> bool:
        return self.steps_to_target is not None

    def to_frame(self) -> pd.DataFrame:
        return self.history.copy()

    def plot(self, ax=None, label: str | None = None):
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 3))
        ax.plot(self.history["step"], self.history["val_accuracy"], "o-", ms=3, label=label)
        ax.axhline(self.target, color="0.6", ls=":", lw=1)
        ax.set_xlabel("reverse fine-tuning step")
        ax.set_ylabel("old-task val accuracy")
        ax.set_ylim(0, 1.05)
        if label:
            ax.legend(frameon=False)
        fig.tight_layout()
        return fig


def reverse_finetune(
    model,
    tok,
    task: Task,
    target: float,
    max_steps: int = 500,
    lr: float = 1e-4,
    batch_size: int = 32,
    eval_every: int = 10,
    eval_n: int = 128,
    seed: int = 0,
    method=None,
    progress: bool = False,
) -> ReverseFinetuneResult:
    """Fine-tune a copy of ``model`` on ``task`` until its validation accuracy reaches ``target``.

    Jain et al. 2024 ("reFT"): a capability hidden under a wrapper comes back within a few hundred steps,
    much faster than training it from a start that never had it. The loop is the package's training step
    (``method``'s optimiser and hooks, default full fine-tuning; constant ``lr``; batch ``t`` of stream
    ``seed``), evaluated on ``eval_n`` ``val`` examples before the first step and every ``eval_every`` steps.

    Returns the number of steps at the first evaluation with accuracy >= ``target`` (0 if the model starts
    there; None if never within ``max_steps``), the history and the trained copy.
    """
    from ..methods import Full
    from ..train import TrainState

    check_float(target, "target", "reverse_finetune", 0.0, 1.0)
    check_int(max_steps, "max_steps", "reverse_finetune", 1)
    check_float(lr, "lr", "reverse_finetune", 0.0, low_open=True)
    check_int(eval_every, "eval_every", "reverse_finetune", 1)
    method = Full() if method is None else method
    model = method.apply(copy_module.deepcopy(model))
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    optimizer = method.make_optimizer(model, lr=lr)

    def compute_loss(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return task.loss(logits, batch)

    def evaluate(step: int, loss: float) -> float:
        accuracy = task.evaluate(model, tok, split="val", n=eval_n)["accuracy"]
        history.append({"step": step, "train_loss": loss, "val_accuracy": accuracy})
        return accuracy

    history: list[dict] = []
    reached = 0 if evaluate(0, math.nan) >= target else None
    model.train()
    running = []
    for step in tqdm(range(max_steps), disable=not progress or reached is not None, desc="reverse fine-tuning", leave=False):
        if reached is not None:
            break
        state = TrainState(step=step, steps=max_steps, lr=lr, model=model, optimizer=optimizer, seed=seed)
        method.before_step(state)
        batch = task.batch(tok, batch_size, step=step, split="train", seed=seed, device=device)
        running.append(float(method.training_step(state, batch, compute_loss, 1.0)))
        method.after_step(state)
        done = step + 1
        if done % eval_every == 0 or done == max_steps:
            if evaluate(done, sum(running) / len(running)) >= target:
                reached = done
            running = []
            model.train()
    model.eval()
    merged = method.merge(model, copy=False) if method.has_dense_form else model
    return ReverseFinetuneResult(steps_to_target=reached, target=target, history=pd.DataFrame(history), model=merged)
