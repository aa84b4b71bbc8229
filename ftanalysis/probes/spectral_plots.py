"""Figures of the spectral probes (intruder dimensions, spectra, the lambda trade-off). Each returns a ``Figure``.

The layouts follow Shuttleworth et al. 2024 (arXiv 2410.21228): the |cos| heatmap of their Figs. 1 and 3,
intruders against eps (Fig. 4) and against k (Fig. 15), the lambda trade-off of Fig. 8; and Biderman et al.
2024 (arXiv 2405.09673), Fig. 6, for the per-layer rank of the update.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _axes(ax, figsize):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _reports(reports) -> dict[str, pd.DataFrame]:
    if isinstance(reports, pd.DataFrame):
        return {"": reports}
    if isinstance(reports, Mapping) and all(isinstance(v, pd.DataFrame) for v in reports.values()):
        return dict(reports)
    raise TypeError(f"Expected a spectral_report DataFrame or a dict of label -> DataFrame. Got {type(reports).__name__}.")


def plot_cos_heatmap(result, n_base: int | None = None, ax=None) -> plt.Figure:
    """|cos| of the top-k singular vectors of ``W1`` (rows) against ``W0``'s first ``n_base`` vectors (columns).

    ``result`` is an :class:`~ftanalysis.probes.spectral.IntruderResult`. A fine-tune without intruders shows a
    bright near-diagonal; an intruder is a dark row (every |cos| below ``eps``), its rank labelled in red.
    """
    cos = result.cos.numpy()
    n_base = min(cos.shape[1], n_base or max(2 * result.k, 20))
    fig, ax = _axes(ax, (0.25 * n_base + 2.2, 0.3 * result.k + 1.6))
    image = ax.imshow(cos[:, :n_base], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel(f"singular vectors of W0 ({result.side}), by rank")
    ax.set_ylabel("top-k vectors of W1, by rank")
    intruder_ranks = {int(rank) for rank in result.ranks}
    ax.set_yticks(range(result.k))
    ax.set_yticklabels([f"intruder {i + 1}" if i + 1 in intruder_ranks else str(i + 1) for i in range(result.k)], fontsize=7)
    for label, i in zip(ax.get_yticklabels(), range(result.k)):
        if i + 1 in intruder_ranks:  # marked on the left, clear of the colour bar
            label.set_color("crimson")
    ticks = list(range(0, n_base, max(1, n_base // 10)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t + 1) for t in ticks], fontsize=7)
    fig.colorbar(image, ax=ax, label="|cos|", fraction=0.04)
    ax.set_title(f"{result.count} intruder(s) at k={result.k}, eps={result.eps}", fontsize=9)
    fig.tight_layout()
    return fig


def intruders_vs_eps_table(reports, eps_grid: Sequence[float], k: int | None = None) -> pd.DataFrame:
    """Total intruders of each report at each ``eps`` (columns ``label, eps, intruders``)."""
    from .spectral import intruder_counts

    rows = [
        {"label": label, "eps": float(eps), "intruders": int(intruder_counts(report, k=k, eps=float(eps)).sum())}
        for label, report in _reports(reports).items()
        for eps in eps_grid
    ]
    return pd.DataFrame(rows)


def intruders_vs_k_table(reports, ks: Sequence[int] | None = None, eps: float | None = None) -> pd.DataFrame:
    """Total intruders of each report for each ``k`` up to the report's (columns ``label, k, intruders``)."""
    from .spectral import intruder_counts

    rows = []
    for label, report in _reports(reports).items():
        k_max = int(report.attrs.get("k", len(report["max_cos"].iloc[0])))
        for k in ks or range(1, k_max + 1):
            if k <= k_max:
                rows.append({"label": label, "k": int(k), "intruders": int(intruder_counts(report, k=int(k), eps=eps).sum())})
    return pd.DataFrame(rows)


def plot_intruders_vs_eps(reports, eps_grid: Sequence[float] = tuple(np.linspace(0.1, 0.9, 17)), k: int | None = None, ax=None) -> plt.Figure:
    """Model-level intruder count against the threshold ``eps`` at fixed ``k`` (the paper's Fig. 4), one line per report."""
    return _plot_intruder_lines(intruders_vs_eps_table(reports, eps_grid, k), "eps", "eps (cosine threshold)", ax)


def plot_intruders_vs_k(reports, ks: Sequence[int] | None = None, eps: float | None = None, ax=None) -> plt.Figure:
    """Model-level intruder count against ``k`` at fixed ``eps`` (the paper's Fig. 15), one line per report."""
    return _plot_intruder_lines(intruders_vs_k_table(reports, ks, eps), "k", "k (top singular vectors tested)", ax)


def _plot_intruder_lines(table: pd.DataFrame, x: str, xlabel: str, ax) -> plt.Figure:
    """One line of intruder counts against column ``x`` per report label."""
    fig, ax = _axes(ax, (4.4, 3.2))
    for label, group in table.groupby("label", sort=False):
        ax.plot(group[x], group["intruders"], marker="o", ms=3, label=label or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("intruder dimensions (sum over matrices)")
    if any(table["label"] != ""):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_spectra(spectra, ax=None, log: bool = True) -> plt.Figure:
    """Singular values of ``W0``, ``W1`` and ``dW`` against their index (a :class:`Spectra` or a dict of arrays)."""
    if isinstance(spectra, Mapping):
        series = {label: np.asarray(values) for label, values in spectra.items()}
    else:
        series = {"W0": spectra.base.numpy(), "W1": spectra.finetuned.numpy(), "dW": spectra.update.numpy()}
    fig, ax = _axes(ax, (4.4, 3.2))
    for label, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=label, lw=1.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_layer_bars(report: pd.DataFrame, column: str = "intruders", ax=None, title: str = "") -> plt.Figure:
    """Per-layer bars of a report column, stacked (sums) or side by side (other statistics) by matrix kind.

    ``column="intruders"`` gives intruders per layer; ``"rank_energy"`` the rank of the update at 90% energy
    (Biderman et al. 2024, Fig. 6); ``"dW_rel"`` the relative size of the update.
    """
    if column not in report.columns:
        raise ValueError(f"The 'column' parameter of plot_layer_bars must be a report column. Got {column!r}.")
    table = report.pivot_table(index="layer", columns="kind", values=column, aggfunc="sum")
    fig, ax = _axes(ax, (1.2 + 0.7 * len(table), 3.2))
    layers = table.index.to_numpy()
    if column == "intruders":
        bottom = np.zeros(len(table))
        for kind in table.columns:
            ax.bar(layers, table[kind].to_numpy(), bottom=bottom, label=kind)
            bottom += table[kind].to_numpy()
    else:
        width = 0.8 / max(1, len(table.columns))
        for i, kind in enumerate(table.columns):
            ax.bar(layers + (i - (len(table.columns) - 1) / 2) * width, table[kind].to_numpy(), width=width, label=kind)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(column)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_lambda_tradeoff(
    table: pd.DataFrame,
    x: str = "lam",
    y: Sequence[str] = ("target_accuracy", "retention"),
    group: str | None = "direction",
) -> plt.Figure:
    """The lambda trade-off (the paper's Fig. 8): metrics against the scale ``lam`` of the scaled directions.

    ``table`` has one row per (``group``, ``lam``) with the ``y`` columns (e.g. target accuracy and a retention
    or forgetting measure); one panel per ``y`` column and one line per group (intruder vs control direction).
    """
    missing = [c for c in [x, *y, *([group] if group else [])] if c not in table.columns]
    if missing:
        raise ValueError(f"plot_lambda_tradeoff: the table lacks columns {missing}. Columns: {list(table.columns)}.")
    fig, axes = plt.subplots(1, len(y), figsize=(3.8 * len(y), 3.1), squeeze=False)
    groups = table.groupby(group, sort=False) if group else [("", table)]
    for label, part in groups:
        part = part.sort_values(x)
        for ax, column in zip(axes[0], y):
            ax.plot(part[x], part[column], marker="o", ms=4, label=str(label) or None)
    for ax, column in zip(axes[0], y):
        ax.set_xlabel(x)
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3)
    if group:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
