"""Circuits as grouped heads, run alone (everything else mean-ablated), with faithfulness and a random control.

Wang et al. 2022 (IOI, arXiv 2211.00593, Section 4: faithfulness with mean ablation); Prakash et al. 2024,
"Fine-Tuning Enhances Existing Mechanisms" (arXiv 2402.14811): circuit heads grouped by role, each group
active only at its own token position, every other (head, position) mean-ablated over a reference set,
and a random circuit of the same group sizes as the control.

Rule: with ``keep[l, pos, head]`` true exactly for the circuit's heads at their groups' positions,

    z[l, pos, head] := z[l, pos, head] if keep[l, pos, head] else mean_ref z[l, pos, head]

(the mean over the reference prompts at the same position), and

    faithfulness = accuracy(circuit only) / accuracy(full model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..._validation import check_int
from ...stats import wilson_interval
from ._common import Head, as_ids, check_heads, last_token_accuracy, model_device, position_mask
from .hooks import _forward, _view, act_name, run_with_cache, run_with_hooks
from .patching import eval_mode


@dataclass(frozen=True)
class Circuit:
    """Heads grouped by role, each group acting at one named position (or at every position).

    Parameters
    ----------
    groups : dict of str -> list of (layer, head)
        E.g. ``{"value fetcher": [(1, 2)], "position transmitter": [(0, 3)]}``.
    positions : dict of str -> str or None, default={}
        The position role of each group, e.g. ``{"value fetcher": "last"}``: a key of the ``roles`` mapping
        given at evaluation time. A group missing here (or mapped to None) acts at every position.
    """

    groups: dict[str, tuple[Head, ...]]
    positions: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.groups, dict) or not self.groups:
            raise TypeError(f"The 'groups' parameter of Circuit must be a non-empty dict of group -> heads. Got {self.groups!r}.")
        groups = {}
        for name, heads in self.groups.items():
            pairs = []
            for item in heads:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise TypeError(f"Circuit group {name!r} must list (layer, head) pairs. Got {item!r}.")
                pairs.append((int(item[0]), int(item[1])))
            groups[name] = tuple(pairs)
        object.__setattr__(self, "groups", groups)
        unknown = set(self.positions) - set(groups)
        if unknown:
            raise ValueError(f"Circuit 'positions' names groups that do not exist: {sorted(unknown)}. Groups: {list(groups)}.")

    @property
    def heads(self) -> list[Head]:
        """Every head of the circuit (sorted, without repeats)."""
        return sorted({h for heads in self.groups.values() for h in heads})

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(heads) for name, heads in self.groups.items()}

    @property
    def size(self) -> int:
        """Number of (group, head) entries, i.e. components counted with their positions."""
        return sum(self.sizes.values())

    def random_like(self, n_layers: int, n_heads: int, seed: int = 0, exclude: bool = False) -> "Circuit":
        """A circuit with the same group sizes and positions but heads drawn uniformly at random (seeded).

        With ``exclude=True`` each group's heads are drawn among the heads *not* in that group of this circuit.
        """
        rng = random.Random(seed)
        everything = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        groups = {}
        for name, heads in self.groups.items():
            pool = [h for h in everything if not (exclude and h in heads)]
            if len(heads) > len(pool):
                raise ValueError(f"Cannot draw {len(heads)} random heads for group {name!r} from {len(pool)} candidates.")
            groups[name] = tuple(sorted(rng.sample(pool, len(heads))))
        return Circuit(groups, dict(self.positions))

    def overlap(self, other: "Circuit") -> pd.DataFrame:
        """Per group (and overall): sizes, shared heads, precision (|A & B| / |B|) and recall (|A & B| / |A|)."""
        rows = []
        names = list(dict.fromkeys([*self.groups, *other.groups]))
        for name in names + ["all"]:
            a = set(self.heads if name == "all" else self.groups.get(name, ()))
            b = set(other.heads if name == "all" else other.groups.get(name, ()))
            shared = len(a & b)
            rows.append({"group": name, "this": len(a), "other": len(b), "shared": shared,
                         "precision": shared / len(b) if b else float("nan"), "recall": shared / len(a) if a else float("nan")})
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"group": g, "layer": layer, "head": head, "position": self.positions.get(g)}
                             for g, heads in self.groups.items() for layer, head in heads])

    def plot(self, title: str = "circuit", **kwargs):
        from .plots import circuit_diagram

        return circuit_diagram(self, title=title, **kwargs)


def keep_masks(circuit: Circuit, view, n: int, seq: int, roles: dict | None, device, owner: str) -> dict[int, torch.Tensor]:
    """``{layer: bool [batch, pos, head]}``: True where the circuit keeps a head's own output."""
    check_heads(circuit.heads, view, owner, "circuit")
    roles = roles or {}
    masks = {layer: torch.zeros(n, seq, view.n_heads, dtype=torch.bool, device=device) for layer in range(view.n_layers)}
    for name, heads in circuit.groups.items():
        role = circuit.positions.get(name)
        if role is not None and role not in roles:
            raise ValueError(f"{owner}: circuit group {name!r} acts at position role {role!r}, missing from 'roles' (has {sorted(roles)}).")
        where = position_mask(roles[role] if role is not None else None, n, seq, owner, f"roles[{role!r}]", device)
        for layer, head in heads:
            masks[layer][:, :, head] |= where
    return masks


@torch.no_grad()
def mean_head_outputs(model, reference_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{layer: [pos, head, d_head]}``: every head's output averaged over the reference prompts, per position."""
    view = _view(model)
    with eval_mode(model):
        _, cache = run_with_cache(model, reference_ids, names_filter=[act_name("z", layer) for layer in range(view.n_layers)])
    return {layer: cache["z", layer].mean(0) for layer in range(view.n_layers)}


def run_circuit(model, input_ids, circuit: Circuit, means: dict[int, torch.Tensor], roles: dict | None = None) -> torch.Tensor:
    """Logits of ``model`` with only ``circuit`` active (other heads/positions set to ``means``)."""
    owner = "run_circuit"
    view = _view(model)
    device = model_device(model)
    ids = as_ids(input_ids, "input_ids", owner, device, model=model)
    n, seq = ids.shape
    if means[0].shape[0] != seq:
        raise ValueError(f"{owner}: the reference means cover {means[0].shape[0]} positions but the inputs have {seq}; use prompts of one length.")
    masks = keep_masks(circuit, view, n, seq, roles, device, owner)

    def ablate(layer):
        def hook(value, _point):
            return torch.where(masks[layer][..., None], value, means[layer].to(value.dtype)[None])

        return hook

    return run_with_hooks(model, ids, fwd_hooks=[(act_name("z", layer), ablate(layer)) for layer in range(view.n_layers)])


@dataclass
class CircuitEvaluation:
    """Full-model and circuit-only accuracy, faithfulness, and the same-size random-circuit control."""

    full_accuracy: float
    circuit_accuracy: float
    faithfulness: float
    random_accuracies: list[float]
    n: int
    full_ci: tuple[float, float]
    circuit_ci: tuple[float, float]

    @property
    def random_accuracy(self) -> float:
        return sum(self.random_accuracies) / len(self.random_accuracies) if self.random_accuracies else float("nan")

    @property
    def random_faithfulness(self) -> float:
        return self.random_accuracy / self.full_accuracy if self.full_accuracy > 0 else float("nan")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([
            {"run": "full model", "accuracy": self.full_accuracy, "ci_low": self.full_ci[0], "ci_high": self.full_ci[1], "faithfulness": 1.0},
            {"run": "circuit", "accuracy": self.circuit_accuracy, "ci_low": self.circuit_ci[0], "ci_high": self.circuit_ci[1],
             "faithfulness": self.faithfulness},
            {"run": f"random circuits (mean of {len(self.random_accuracies)})", "accuracy": self.random_accuracy,
             "ci_low": min(self.random_accuracies, default=float("nan")), "ci_high": max(self.random_accuracies, default=float("nan")),
             "faithfulness": self.random_faithfulness},
        ])


def evaluate_circuit(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    circuit: Circuit,
    reference_ids: torch.Tensor,
    roles: dict | None = None,
    n_random: int = 10,
    seed: int = 0,
) -> CircuitEvaluation:
    """Faithfulness of ``circuit`` in ``model``: accuracy with only the circuit active over full accuracy.

    Parameters
    ----------
    model : nn.Module
        GPT-2 or Llama-family causal LM.
    input_ids : LongTensor ``[batch, pos]``
        Evaluation prompts, all of one length; the answer is read at the last position.
    answer_ids : LongTensor ``[batch]``
        The correct next token of each prompt.
    circuit : Circuit
        Heads by group, with each group's position role.
    reference_ids : LongTensor ``[ref, pos]``
        Prompts of the same length whose per-position mean head outputs replace the ablated ones (the paper
        uses prompts of the same task with other objects, labels and queries).
    roles : dict of str -> position spec, optional
        Positions of each role for the evaluation prompts (``[batch]`` tensors of per-example positions,
        ints, or boolean masks), e.g. ``{"last": -1, "query label": -3, "previous query label": tensor}``.
    n_random : int, default=10
        Random circuits with the same group sizes and positions (``Circuit.random_like`` with seeds
        ``seed, seed + 1, ...``).
    seed : int, default=0

    Returns
    -------
    CircuitEvaluation
    """
    owner = "evaluate_circuit"
    check_int(n_random, "n_random", owner, 0)
    view = _view(model)
    device = model_device(model)
    ids = as_ids(input_ids, "input_ids", owner, device, model=model)
    reference = as_ids(reference_ids, "reference_ids", owner, device, model=model)
    answers = torch.as_tensor(answer_ids).long().to(device)
    if answers.shape != (ids.shape[0],):
        raise ValueError(f"{owner}: 'answer_ids' must have shape ({ids.shape[0]},). Got {tuple(answers.shape)}.")
    if reference.shape[1] != ids.shape[1]:
        raise ValueError(f"{owner}: 'reference_ids' has {reference.shape[1]} positions but 'input_ids' has {ids.shape[1]}; they must match.")
    n = ids.shape[0]
    with eval_mode(model), torch.no_grad():
        means = mean_head_outputs(model, reference)
        full = int(last_token_accuracy(_forward(model, ids), answers).sum())
        kept = int(last_token_accuracy(run_circuit(model, ids, circuit, means, roles), answers).sum())
        random_acc = []
        for i in range(n_random):
            control = circuit.random_like(view.n_layers, view.n_heads, seed=seed + i)
            random_acc.append(float(last_token_accuracy(run_circuit(model, ids, control, means, roles), answers).float().mean()))
    full_acc, circuit_acc = full / n, kept / n
    return CircuitEvaluation(
        full_accuracy=full_acc,
        circuit_accuracy=circuit_acc,
        faithfulness=circuit_acc / full_acc if full_acc > 0 else float("nan"),
        random_accuracies=random_acc,
        n=n,
        full_ci=wilson_interval(full, n),
        circuit_ci=wilson_interval(kept, n),
    )
