"""Attribution patching: a first-order estimate of activation patching from two forward and one backward pass.

Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale" (blog post,
neelnanda.io/mechanistic-interpretability/attribution-patching); Syed, Rager and Conmy 2023, "Attribution
Patching Outperforms Automated Circuit Discovery" (arXiv 2310.10348); Kramar et al. 2024, "AtP*"
(arXiv 2403.00745).

Rule: with ``a`` the activation of a component and ``M`` the metric (mean over examples),

    M(patched c) - M(corrupt) ~= sum over the component's features of (a_clean - a_corrupt) * dM/da |_corrupt

for every component at once: one clean forward pass (the cache), one corrupted forward pass and one backward
pass. The estimate is normalised like :func:`~ftanalysis.probes.circuits.activation_patching` (divided by
``M(clean) - M(corrupt)``), so the two are directly comparable. It is exact when the metric is linear in the
activation (tested), and it fails where the path is strongly non-linear (saturated softmax, attention
patterns that switch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from ..._validation import check_int, check_option
from ._common import as_ids, call_metric, check_head_indices, check_layers, check_pair, model_device, spearman
from .hooks import _forward, _view, act_name, hooks, run_with_cache
from .patching import COMPONENTS, PER_HEAD, PatchingResult, eval_mode, head_kind, n_heads_of, to_pos_major


def attribution_patching(
    model: torch.nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    metric,
    component: str = "z",
    *,
    layers=None,
    heads=None,
    positions=None,
    per_position: bool = True,
    normalize: bool = True,
) -> PatchingResult:
    """First-order (gradient) estimate of :func:`activation_patching` for every component at once.

    Parameters
    ----------
    model, clean_ids, corrupt_ids, metric, component, layers, heads, per_position, normalize
        As in :func:`~ftanalysis.probes.circuits.activation_patching` (clean and corrupt must have the same
        length here).
    positions : list of int, optional
        Positions to report (all by default).

    Returns
    -------
    PatchingResult
        ``effect`` holds the estimate, same axes and normalisation as activation patching; ``patched`` holds
        ``corrupt_metric + estimated difference``.

    Notes
    -----
    Gradients are taken with ``torch.autograd.grad`` with respect to the activations only: no parameter's
    ``.grad`` is touched and the model is not modified. Dropout is off during the runs.
    """
    owner = "attribution_patching"
    check_option(component, "component", owner, COMPONENTS)
    view = _view(model)
    device = model_device(model)
    clean = as_ids(clean_ids, "clean_ids", owner, device, model=model)
    corrupt = as_ids(corrupt_ids, "corrupt_ids", owner, device, model=model)
    check_pair(clean, corrupt, owner)
    n, seq = clean.shape
    layers = check_layers(layers, view, owner)
    per_head = component in PER_HEAD
    if per_head:
        heads = check_head_indices(heads, n_heads_of(view, component), owner, head_kind(view, component))
    elif heads is not None:
        raise ValueError(f"{owner}: 'heads' applies to per-head components {list(PER_HEAD)}, not to {component!r}.")
    if positions is None:
        positions = list(range(seq))
    positions = [positions] if isinstance(positions, int) else list(positions)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -seq <= p < seq:
            raise ValueError(f"{owner}: position {p!r} is out of range for sequences of length {seq}.")
    positions = [p % seq for p in positions]
    names = [act_name(component, layer) for layer in layers]

    with eval_mode(model):
        with torch.no_grad():
            clean_logits, clean_cache = run_with_cache(model, clean, names_filter=names)
            clean_metric = float(call_metric(metric, clean_logits, n, owner).mean())
        acts: dict[str, torch.Tensor] = {}

        def keep(value: torch.Tensor, point) -> torch.Tensor:
            if not value.requires_grad:  # nothing upstream needs grad (frozen model): start the graph here
                value = value.detach().requires_grad_(True)
            acts[point.name] = value
            return value  # route the forward pass through the tensor we differentiate against

        with torch.enable_grad(), hooks(model, fwd_hooks=[(name, keep) for name in names]):
            corrupt_logits = _forward(model, corrupt)
            corrupt_values = call_metric(metric, corrupt_logits, n, owner)
            grads = torch.autograd.grad(corrupt_values.mean(), [acts[name] for name in names], allow_unused=True)
    corrupt_metric = float(corrupt_values.mean().detach())

    rows = []
    for name, grad in zip(names, grads):
        a_corrupt = to_pos_major(acts[name].detach(), component)
        a_clean = to_pos_major(clean_cache[name], component)
        g = torch.zeros_like(a_corrupt) if grad is None else to_pos_major(grad, component)
        contrib = (a_clean - a_corrupt) * g  # [batch, pos, (head,) features]
        contrib = contrib.sum(0)  # the gradient of the mean already carries 1 / batch
        contrib = contrib.flatten(2).sum(-1) if per_head else contrib.sum(-1)  # [pos, head] or [pos]
        contrib = contrib[positions]
        if per_head:
            contrib = contrib[:, heads]
            if not per_position:
                contrib = contrib.sum(0)
        rows.append(contrib.double())
    estimate = torch.stack(rows).float()
    dims = ("layer", "pos", "head") if per_head and per_position else ("layer", "head") if per_head else ("layer", "pos")
    effect = estimate
    if normalize:
        gap = clean_metric - corrupt_metric
        if abs(gap) < 1e-12:
            raise ValueError(f"{owner}: the metric is the same on the clean and the corrupted input; use normalize=False.")
        effect = estimate / gap
    return PatchingResult(
        effect=effect,
        patched=corrupt_metric + estimate,
        clean_metric=clean_metric,
        corrupt_metric=corrupt_metric,
        component=component,
        dims=dims,
        layers=layers,
        positions=positions if "pos" in dims else None,
        heads=heads if per_head else None,
        normalized=normalize,
    )


@dataclass
class AttributionComparison:
    """Agreement of attribution patching with exact activation patching.

    ``spearman``: rank correlation over all components; ``spearman_top``: over the ``top_k`` components with
    the largest exact ``|effect|``; ``top_overlap``: fraction of the exact top-``k`` (by ``|effect|``) that are
    also in the attribution top-``k``; ``max_abs_error``: largest ``|estimate - exact|`` (normalised units).
    """

    spearman: float
    spearman_top: float
    top_overlap: float
    top_k: int
    max_abs_error: float
    exact: torch.Tensor = field(repr=False)
    estimate: torch.Tensor = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"exact": self.exact.flatten().tolist(), "attribution": self.estimate.flatten().tolist()})

    def plot(self, title: str = "attribution vs exact patching"):
        from .plots import scatter_comparison

        return scatter_comparison(self.exact.flatten(), self.estimate.flatten(), title=f"{title} (Spearman {self.spearman:.2f})")


def compare_with_exact(attribution: PatchingResult, exact: PatchingResult, top_k: int = 10) -> AttributionComparison:
    """Rank agreement of an attribution-patching result with the exact activation-patching result.

    Both results must cover the same components (same shape and indices).
    """
    owner = "compare_with_exact"
    if not isinstance(attribution, PatchingResult) or not isinstance(exact, PatchingResult):
        raise TypeError(f"{owner} expects two PatchingResult objects. Got {type(attribution).__name__} and {type(exact).__name__}.")
    if attribution.effect.shape != exact.effect.shape or attribution.dims != exact.dims:
        raise ValueError(
            f"{owner}: the results cover different components: {attribution.dims} {tuple(attribution.effect.shape)} "
            f"vs {exact.dims} {tuple(exact.effect.shape)}."
        )
    check_int(top_k, "top_k", owner, 1)
    a, e = attribution.effect.flatten().float(), exact.effect.flatten().float()
    k = min(top_k, e.numel())
    top_exact = e.abs().topk(k).indices
    top_attr = a.abs().topk(k).indices
    overlap = len(set(top_exact.tolist()) & set(top_attr.tolist())) / k
    return AttributionComparison(
        spearman=spearman(a, e),
        spearman_top=spearman(a[top_exact], e[top_exact]) if k > 2 else float("nan"),
        top_overlap=overlap,
        top_k=k,
        max_abs_error=float((a - e).abs().max()),
        exact=exact.effect,
        estimate=attribution.effect,
    )
