"""Figures of the circuit probes: [layer, head] heatmaps, per-position bars, circuit diagrams. Each returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402


def _limits(values: torch.Tensor, center: float | None):
    finite = values[torch.isfinite(values)]
    if center is None or finite.numel() == 0:
        return {}
    span = float((finite - center).abs().max()) or 1.0
    return {"vmin": center - span, "vmax": center + span}


def head_heatmap(values: torch.Tensor, title: str = "", center: float | None = 0.0, ax=None, label: str = "effect") -> plt.Figure:
    """``[layer, head]`` heatmap (diverging colours around ``center``), each cell annotated."""
    values = torch.as_tensor(values).detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"head_heatmap expects a [layer, head] tensor. Got shape {tuple(values.shape)}.")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.0 + 0.55 * values.shape[1], 0.8 + 0.45 * values.shape[0]))
    image = ax.imshow(values.numpy(), cmap="RdBu_r", aspect="auto", **_limits(values, center))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    if values.numel() <= 400:
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])).tolist(), values.flatten().tolist()):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label=label, fraction=0.05)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def position_bars(values, tokens: list[str] | None = None, title: str = "", ax=None, label: str = "effect") -> plt.Figure:
    """One bar per sequence position (token labels on the x axis)."""
    values = torch.as_tensor(values).detach().float().cpu().flatten()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(max(4.0, 0.28 * len(values)), 2.8))
    ax.bar(range(len(values)), values.numpy(), color=["#b2182b" if v > 0 else "#2166ac" for v in values.tolist()])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(tokens if tokens is not None else range(len(values)), rotation=90, fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def patching_heatmap(result, title: str | None = None, tokens: list[str] | None = None) -> plt.Figure:
    """Heatmap of a :class:`PatchingResult`: rows are layers (or layer.head), columns positions (or heads)."""
    effect = result.effect.detach().float().cpu()
    title = title or f"activation patching: {result.component}"
    if result.dims == ("layer", "head"):
        return head_heatmap(effect, title=title)
    if result.dims == ("layer", "pos", "head"):
        rows = [f"L{layer}.H{head}" for layer in result.layers for head in result.heads]
        grid = effect.permute(0, 2, 1).reshape(len(rows), -1)  # [layer * head, pos]
    else:
        rows = [f"L{layer}" for layer in result.layers]
        grid = effect
    labels = tokens or (result.tokens if result.tokens else [str(p) for p in result.positions])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * grid.shape[1] + 1.5), 0.8 + 0.25 * grid.shape[0]))
    image = ax.imshow(grid.numpy(), cmap="RdBu_r", aspect="auto", **_limits(grid, 0.0))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("position")
    fig.colorbar(image, ax=ax, label="normalised effect" if result.normalized else "metric change", fraction=0.04)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def circuit_diagram(circuit, title: str = "circuit", colors: list[str] | None = None) -> plt.Figure:
    """A circuit as grouped head lists: one column per group (its position role below), arrows between groups.

    Groups are drawn in the order of ``circuit.groups``, information flowing left to right.
    """
    groups = list(circuit.groups.items())
    colors = colors or ["#fdb863", "#b2abd2", "#a6dba0", "#92c5de", "#f4a582", "#d9d9d9"]
    tallest = max(len(h) for _, h in groups)
    fig, ax = plt.subplots(figsize=(1.2 + 2.3 * len(groups), 1.4 + 0.42 * tallest))
    for i, (name, heads) in enumerate(groups):
        x = 2.3 * i
        ax.add_patch(plt.Rectangle((x, 0), 1.8, 0.42 * tallest + 0.5, facecolor=colors[i % len(colors)], edgecolor="black", alpha=0.6))
        ax.text(x + 0.9, 0.42 * tallest + 0.7, name, ha="center", fontsize=9, weight="bold")
        position = circuit.positions.get(name)
        ax.text(x + 0.9, -0.35, f"@ {position}" if position else "@ all positions", ha="center", fontsize=8, style="italic")
        for j, (layer, head) in enumerate(sorted(heads)):
            ax.text(x + 0.9, 0.42 * tallest + 0.15 - 0.42 * (j + 0.6), f"L{layer}.H{head}", ha="center", fontsize=8, family="monospace")
        if i + 1 < len(groups):
            ax.annotate("", xy=(x + 2.3, 0.21 * tallest + 0.25), xytext=(x + 1.8, 0.21 * tallest + 0.25), arrowprops={"arrowstyle": "->"})
    ax.set_xlim(-0.3, 2.3 * len(groups))
    ax.set_ylim(-0.7, 0.42 * tallest + 1.1)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def scatter_comparison(exact: torch.Tensor, estimate: torch.Tensor, title: str = "") -> plt.Figure:
    """Attribution estimate against exact patching, one point per component, with the diagonal."""
    exact, estimate = exact.detach().float().cpu(), estimate.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.scatter(exact.numpy(), estimate.numpy(), s=10, alpha=0.7)
    low = float(min(exact.min(), estimate.min()))
    high = float(max(exact.max(), estimate.max()))
    ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("activation patching (exact)")
    ax.set_ylabel("attribution patching")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_bars(table: pd.DataFrame, base: float, ft: float, title: str = "") -> plt.Figure:
    """Per-group accuracy of the patched base (95% intervals), the random-heads control, and both models' levels."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(table), 3.2))
    xs = range(len(table))
    err = [table["accuracy"] - table["ci_low"], table["ci_high"] - table["accuracy"]]
    ax.bar([x - 0.2 for x in xs], table["accuracy"], width=0.4, yerr=err, capsize=3, label="circuit heads from fine-tuned")
    if "random_accuracy" in table:
        ax.bar([x + 0.2 for x in xs], table["random_accuracy"], width=0.4, color="#bbbbbb", label="random heads (same size)")
    ax.axhline(base, color="#2166ac", ls="--", lw=1, label=f"base {base:.2f}")
    ax.axhline(ft, color="#b2182b", ls="--", lw=1, label=f"fine-tuned {ft:.2f}")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(table["group"], fontsize=8, rotation=15)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def captum_figure(attribution, title: str | None = None) -> plt.Figure:
    """Captum attributions: the [layer, head] (or [layer, pos]) map and the per-position totals."""
    title = title or f"{attribution.method} -> {attribution.target!r}"
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.2), gridspec_kw={"width_ratios": [1, 2]})
    if attribution.level == "head":
        head_heatmap(attribution.scores, title=f"{title}: heads", ax=left, label="attribution")
        totals = attribution.per_position.sum(dim=(0, 2))
    else:
        grid = attribution.scores.detach().float().cpu()
        left.imshow(grid.numpy(), cmap="RdBu_r", aspect="auto", **_limits(grid, 0.0))
        left.set_xlabel("position")
        left.set_ylabel("layer")
        left.set_title(f"{title}: layers", fontsize=9)
        totals = attribution.per_position[0]
    position_bars(totals, attribution.tokens, title="per position" + (" (all heads)" if attribution.level == "head" else " (layer 0 input)"),
                  ax=right, label="attribution")
    fig.tight_layout()
    return fig
