"""Calibration: expected calibration error (ECE) with equal-width bins and the reliability diagram.

Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599).
A classifier is calibrated when, among the predictions made with confidence ``p``, a fraction ``p`` is right.
With the confidence ``c_i = max_k p_ik`` of each prediction and the ``B`` equal-width bins
``(0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]``::

    ECE = sum_b (n_b / n) * | acc(b) - conf(b) |

where ``acc(b)`` and ``conf(b)`` are the accuracy and the mean confidence of the ``n_b`` predictions in bin
``b`` (empty bins contribute nothing). Panigrahi et al. 2023 (arXiv 2302.06600) report it with 15 bins for
grafted against fine-tuned models; 15 is the default here too.

>>> import torch
>>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
>>> result = expected_calibration_error(probs, torch.tensor([0, 1, 1, 0]), n_bins=10)
>>> round(result.ece, 3)  # (|1 - .95| + |0 - .85| + |1 - .75| + |1 - .65|) / 4
0.375
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import torch

from .._validation import check_int
from ..tasks.base import Task


@dataclass
class CalibrationResult:
    """The ECE and its per-bin table.

    Attributes
    ----------
    ece : float
        Expected calibration error, in [0, 1].
    mce : float
        Maximum calibration error: the largest ``|acc(b) - conf(b)|`` over non-empty bins.
    accuracy : float
        Accuracy of the argmax predictions.
    bins : pandas.DataFrame
        One row per bin: ``lower``, ``upper``, ``count``, ``confidence`` (mean), ``accuracy``, ``gap``
        (``accuracy - confidence``); NaN for empty bins.
    n : int
        Number of predictions.
    label : str
        Name used in tables and figure legends.
    """

    ece: float
    mce: float
    accuracy: float
    bins: pd.DataFrame
    n: int
    label: str = ""

    def to_frame(self) -> pd.DataFrame:
        """The per-bin table (a copy), with the label as a column."""
        return self.bins.assign(label=self.label)

    def summary(self) -> dict:
        return {"label": self.label, "ece": self.ece, "mce": self.mce, "accuracy": self.accuracy, "n": self.n}

    def plot(self, ax=None) -> plt.Figure:
        """Reliability diagram of this result (see :func:`reliability_diagram`)."""
        return reliability_diagram([self], ax=ax)


def _as_tensor(x, name: str, dtype) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as err:  # noqa: BLE001 - re-raised with the parameter's name
            raise TypeError(f"The {name!r} parameter must be a tensor or array. Got {type(x).__name__}.") from err
    return x.detach().cpu().to(dtype)


def expected_calibration_error(probs, labels, n_bins: int = 15, label: str = "") -> CalibrationResult:
    """ECE of class probabilities against true labels, with ``n_bins`` equal-width confidence bins.

    Parameters
    ----------
    probs : tensor or array, shape ``[n, n_classes]`` (rows sum to 1) or ``[n]``
        Class probabilities. A 1-D input is read as the probability of class 1 of a binary problem.
    labels : tensor or array of int, shape ``[n]``
        True class indices.
    n_bins : int, default=15
        Number of equal-width bins on the confidence axis; bins are right-closed, ``(lo, hi]`` (Guo et al.).
    label : str, default=""
        Name of the model, kept for tables and legends.

    Returns
    -------
    CalibrationResult
    """
    n_bins = check_int(n_bins, "n_bins", "expected_calibration_error", 1)
    probs = _as_tensor(probs, "probs", torch.float64)
    labels = _as_tensor(labels, "labels", torch.long)
    if probs.ndim == 1:
        probs = torch.stack([1 - probs, probs], dim=1)  # [n, 2]
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0] or probs.shape[0] == 0:
        raise ValueError(
            "expected_calibration_error needs probs of shape [n, n_classes] and labels of shape [n] with n >= 1. "
            f"Got probs {tuple(probs.shape)} and labels {tuple(labels.shape)}."
        )
    if (probs < -1e-6).any() or (probs > 1 + 1e-6).any() or not torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-3):
        raise ValueError("The 'probs' parameter of expected_calibration_error must hold probabilities (each row in [0, 1], summing to 1).")
    if (labels < 0).any() or (labels >= probs.shape[1]).any():
        raise ValueError(f"The 'labels' parameter must hold class indices in [0, {probs.shape[1] - 1}]. Got {labels.min()}..{labels.max()}.")
    confidence, predicted = probs.max(dim=1)  # [n], [n]
    correct = (predicted == labels).to(torch.float64)
    # right-closed bins (lo, hi] as in Guo et al.'s code; a confidence of exactly 0 goes to the first bin
    upper = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:]  # [n_bins]
    index = torch.searchsorted(upper, confidence, right=False).clamp(0, n_bins - 1)  # first upper >= confidence
    rows, ece, mce = [], 0.0, 0.0
    n = len(labels)
    for b in range(n_bins):
        in_bin = index == b
        count = int(in_bin.sum())
        if count:
            conf_b, acc_b = float(confidence[in_bin].mean()), float(correct[in_bin].mean())
            ece += count / n * abs(acc_b - conf_b)
            mce = max(mce, abs(acc_b - conf_b))
        else:
            conf_b = acc_b = float("nan")
        rows.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count, "confidence": conf_b, "accuracy": acc_b, "gap": acc_b - conf_b})
    return CalibrationResult(ece=ece, mce=mce, accuracy=float(correct.mean()), bins=pd.DataFrame(rows), n=n, label=label)


@torch.no_grad()
def task_probabilities(model, tok, task, split: str = "test", n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [n, n_classes], labels [n])`` of a model on a task's fixed examples.

    Classification tasks (``task.kind == "classification"``) use the classifier's class probabilities.
    Language-model tasks use the next-token distribution over the whole vocabulary at the position that
    predicts the *first* answer token; the label is that token's id.
    """
    from ..tasks.base import collate

    if not isinstance(task, Task):
        raise TypeError(f"The 'task' parameter of task_probabilities must be an ftanalysis Task (fta.tasks.make). Got {type(task).__name__}.")

    if getattr(task, "kind", None) == "classification":
        examples = task.examples(n, split)
        probs = task.predict_proba(model, tok, examples)
        return probs, torch.tensor([task.labels.index(e.answer) for e in examples])
    task.check_tokenizer(tok)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out_probs, out_labels = [], []
    examples = task.examples(n, split)
    try:
        for start in range(0, len(examples), 256):
            batch = collate(examples[start : start + 256], tok, device=device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, pos, vocab]
            first = (batch["labels"] != -100).float().argmax(1)  # [b]: position of the first answer token
            rows = torch.arange(len(first), device=first.device)
            out_probs.append(torch.softmax(logits[rows, first - 1].float(), -1).cpu())
            out_labels.append(batch["labels"][rows, first].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out_probs), torch.cat(out_labels)


def calibration(model, tok, task, split: str = "test", n: int = 512, n_bins: int = 15, label: str = "") -> CalibrationResult:
    """ECE of ``model`` on ``n`` examples of ``task`` (see :func:`task_probabilities` for what is scored).

    Examples
    --------
    ``fta.probes.calibration(ft, tok, fta.tasks.make("sentiment_negation"), label="fine-tuned").ece``
    """
    if not isinstance(task, Task):
        raise TypeError(f"The 'task' parameter of calibration must be an ftanalysis Task (fta.tasks.make). Got {type(task).__name__}.")
    probs, labels = task_probabilities(model, tok, task, split=split, n=n)
    return expected_calibration_error(probs, labels, n_bins=n_bins, label=label)


def reliability_diagram(results, ax=None, title: str = "") -> plt.Figure:
    """Reliability diagram: per-bin accuracy against mean confidence, one line per result.

    Parameters
    ----------
    results : CalibrationResult or list of them
    ax : matplotlib Axes, optional
        Draw into this axes (default: a new figure).
    title : str, default=""

    Returns
    -------
    matplotlib.figure.Figure
        The diagonal is perfect calibration; points below it are over-confident. Marker area follows the
        bin's share of the predictions; the legend gives each result's ECE.
    """
    if isinstance(results, CalibrationResult):
        results = [results]
    results = list(results)
    if not results or not all(isinstance(r, CalibrationResult) for r in results):
        raise TypeError("reliability_diagram expects a CalibrationResult or a non-empty list of them.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.8, 3.6))
    else:
        fig = ax.figure
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
    for r in results:
        b = r.bins[r.bins["count"] > 0]
        line = ax.plot(b["confidence"], b["accuracy"], marker=None, lw=1.2)[0]
        ax.scatter(b["confidence"], b["accuracy"], s=8 + 300 * b["count"] / r.n, color=line.get_color(), label=f"{r.label or 'model'} (ECE {r.ece:.3f})", zorder=3)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


__all__ = ["CalibrationResult", "calibration", "expected_calibration_error", "reliability_diagram", "task_probabilities"]
