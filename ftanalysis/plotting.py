"""Matplotlib figures shared by the notebooks and the command line. Every function returns a ``Figure``."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def training_curves(histories: dict[str, pd.DataFrame], columns: list[str], title: str = "") -> plt.Figure:
    """One panel per column (e.g. ``val_accuracy``, ``mix/accuracy``), one line per run."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for label, history in histories.items():
            if column in history:
                ax.plot(history["step"], history[column], marker="o", ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(column)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def before_after_bars(table: pd.DataFrame, metrics: list[str], label_column: str = "method", title: str = "") -> plt.Figure:
    """Grouped bars: one group per metric, one bar per row of ``table``."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.2))
    width = 0.8 / max(1, len(table))
    for i, (_, row) in enumerate(table.iterrows()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [row[m] for m in metrics], width=width, label=str(row[label_column]))
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
