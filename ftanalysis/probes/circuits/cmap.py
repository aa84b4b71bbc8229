"""Cross-model activation patching (CMAP): does the fine-tuned model's gain live in these heads' outputs?

Prakash, Shaham, Haklay, Belinkov and Bau 2024, "Fine-Tuning Enhances Existing Mechanisms: A Case Study on
Entity Tracking" (ICLR 2024, arXiv 2402.14811, Section 6, ``experiment_3/cmap.ipynb``).

Rule: give the same input ``x`` to the base model ``M`` and the fine-tuned model ``M'`` (same architecture);
run ``M(x)`` with the output of each chosen head (``hook_z``, the input of the output projection) at the
group's positions replaced by ``M'``'s, the rest of ``M`` (its ``W_O`` included) unchanged; report the
task accuracy of the patched base. Per group, the fraction of the accuracy gap recovered is

    recovered = (acc(base patched) - acc(base)) / (acc(fine-tuned) - acc(base)).

A random set of heads of the same size, at the same positions, is the control.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..._validation import check_int
from ...stats import wilson_interval
from ._common import as_ids, last_token_accuracy, model_device
from .circuit import Circuit, keep_masks
from .hooks import _forward, _view, act_name, run_with_cache, run_with_hooks
from .patching import eval_mode


@dataclass
class CMAPResult:
    """Accuracy of the base model with each group's head outputs taken from the fine-tuned model."""

    table: pd.DataFrame  # one row per patched set: group, heads, accuracy, ci_low, ci_high, recovered
    base_accuracy: float
    ft_accuracy: float
    n: int

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self, title: str = "cross-model activation patching"):
        from .plots import accuracy_bars

        return accuracy_bars(self.table, base=self.base_accuracy, ft=self.ft_accuracy, title=title)


def _check_pair(base, ft) -> None:
    vb, vf = _view(base), _view(ft)
    shape_b = (vb.family, vb.n_layers, vb.n_heads, vb.d_head)
    shape_f = (vf.family, vf.n_layers, vf.n_heads, vf.d_head)
    if shape_b != shape_f:
        raise ValueError(f"cmap needs two models of one architecture; got (family, layers, heads, d_head) {shape_b} and {shape_f}.")


@torch.no_grad()
def patched_accuracy(base, ft_z: dict[int, torch.Tensor], ids, answers, circuit: Circuit, roles) -> torch.Tensor:
    """``[batch]`` correctness of ``base`` with ``circuit``'s heads (at their positions) set to ``ft_z``."""
    view = _view(base)
    n, seq = ids.shape
    masks = keep_masks(circuit, view, n, seq, roles, ids.device, "cmap")

    def swap(layer):
        def hook(value, _point):
            return torch.where(masks[layer][..., None], ft_z[layer].to(value.dtype), value)

        return hook

    layers = sorted({layer for layer, _ in circuit.heads})
    logits = run_with_hooks(base, ids, fwd_hooks=[(act_name("z", layer), swap(layer)) for layer in layers])
    return last_token_accuracy(logits, answers)


def cmap(
    base: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    components: Circuit | dict,
    roles: dict | None = None,
    n_random: int = 10,
    seed: int = 0,
) -> CMAPResult:
    """Run ``base`` with the chosen heads' outputs replaced by ``ft``'s on the same input; report accuracy.

    Parameters
    ----------
    base, ft : nn.Module
        The base and the fine-tuned model (same architecture; neither is modified).
    input_ids : LongTensor ``[batch, pos]``
        Evaluation prompts; the answer is read at the last position.
    answer_ids : LongTensor ``[batch]``
        Correct next tokens.
    components : Circuit or dict of str -> list of (layer, head)
        Head groups. Each group is patched alone, then all groups together (row ``"all"``).
    roles : dict of str -> position spec, optional
        Positions of the circuit's position roles (see :func:`evaluate_circuit`); groups without a role are
        patched at every position.
    n_random : int, default=10
        Random head sets of the same size and positions per row (seeded ``seed, seed + 1, ...``).
    seed : int, default=0

    Returns
    -------
    CMAPResult
        ``table`` with one row per group and ``"all"``: ``accuracy`` (95% Wilson interval), ``recovered``
        (fraction of the base -> fine-tuned accuracy gap), ``random_accuracy`` and ``random_recovered``.
    """
    owner = "cmap"
    check_int(n_random, "n_random", owner, 0)
    _check_pair(base, ft)
    circuit = components if isinstance(components, Circuit) else Circuit(dict(components))
    view = _view(base)
    device = model_device(base)
    ids = as_ids(input_ids, "input_ids", owner, device, model=base)
    answers = torch.as_tensor(answer_ids).long().to(device)
    if answers.shape != (ids.shape[0],):
        raise ValueError(f"{owner}: 'answer_ids' must have shape ({ids.shape[0]},). Got {tuple(answers.shape)}.")
    n = ids.shape[0]
    with eval_mode(base, ft), torch.no_grad():
        base_acc = int(last_token_accuracy(_forward(base, ids), answers).sum()) / n
        ft_logits, cache = run_with_cache(ft, ids.to(model_device(ft)), names_filter=[act_name("z", layer) for layer in range(view.n_layers)])
        ft_acc = int(last_token_accuracy(ft_logits, answers.to(ft_logits.device)).sum()) / n
        ft_z = {layer: cache["z", layer].to(device) for layer in range(view.n_layers)}
        gap = ft_acc - base_acc
        rows = []
        subsets = [(name, Circuit({name: heads}, {name: circuit.positions.get(name)} if circuit.positions.get(name) else {}))
                   for name, heads in circuit.groups.items()]
        if len(circuit.groups) > 1:
            subsets.append(("all", circuit))
        for name, sub in subsets:
            hits = int(patched_accuracy(base, ft_z, ids, answers, sub, roles).sum())
            random_acc = [
                int(patched_accuracy(base, ft_z, ids, answers, sub.random_like(view.n_layers, view.n_heads, seed + i), roles).sum()) / n
                for i in range(n_random)
            ]
            acc = hits / n
            rand = sum(random_acc) / len(random_acc) if random_acc else float("nan")
            low, high = wilson_interval(hits, n)
            rows.append({
                "group": name, "heads": sub.heads, "accuracy": acc, "ci_low": low, "ci_high": high,
                "recovered": (acc - base_acc) / gap if gap else float("nan"),
                "random_accuracy": rand, "random_recovered": (rand - base_acc) / gap if gap else float("nan"),
            })
    return CMAPResult(table=pd.DataFrame(rows), base_accuracy=base_acc, ft_accuracy=ft_acc, n=n)
