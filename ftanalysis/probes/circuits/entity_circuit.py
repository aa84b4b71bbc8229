"""Find the entity-tracking circuit of a model by iterated path patching, grouped by role.

Prakash et al. 2024, "Fine-Tuning Enhances Existing Mechanisms" (arXiv 2402.14811, Section 4 and
``experiment_1/path_patching.py``): starting from the heads that write the answer into the logits, path
patching is iterated backwards, each step scoring the heads that feed the previous group through one input
at one token position. The groups searched here are the ones a shallow model can hold:

1. **value fetcher** (at the last token): heads whose direct path to the logits carries the answer; found
   with the *query* corruption (another box is queried, so the answer changes);
2. **query mover** (at the last token): heads whose output reaches the fetchers' *queries* (Q-composition),
   carrying which box is asked for; query corruption;
3. **object mover** (at the previous occurrence of the query label in the context): heads whose output
   reaches the fetchers' *values* there (V-composition), carrying which object sits in that box; found with
   the *binding* corruption (same boxes and query, objects rotated among the boxes).

Path patching scores each path inside the *full* model. A circuit run alone (every other head mean-ablated)
can need heads whose paths matter little there, because other heads carry the same signal. In the zoo's
2-layer model the fetchers attend to the object token itself, and what they read at it depends on a layer-0
head there that no path score singles out. :func:`complete_circuit` adds such heads greedily: the candidate
(head, position role) whose kept output raises the circuit-only accuracy most joins, while the gain is at
least ``min_gain`` of the full model's accuracy (the completeness step of Wang et al. 2022, Section 4).

A head joins a group when its normalised path-patching score is at most ``-threshold`` (the score is
``(patched - clean) / (clean - corrupt)``: -1 means the path carries the whole effect). Prakash et al. keep
the top-k heads per group of LLaMA-7B's 1,024; with a few heads a threshold is the natural choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..._validation import check_float
from ._common import last_token_accuracy
from .circuit import Circuit, mean_head_outputs, run_circuit
from .entity import EntityBatch
from .hooks import _view
from .metrics import logit_diff
from .path_patching import PathPatchingResult, path_patching

GROUP_POSITIONS = {"object mover": "previous query label", "query mover": "last", "value fetcher": "last"}
# the groups complete_circuit can add, by the position role where they act
READER_GROUPS = {"object": "object reader", "previous query label": "label reader", "query label": "query-label reader",
                 "last": "last-token helper"}


@dataclass
class EntityCircuitSearch:
    """The circuit found and the path-patching score maps behind each group."""

    circuit: Circuit
    scores: dict[str, PathPatchingResult]
    threshold: float

    def plot(self):
        """One [layer, head] heatmap per search step."""
        import matplotlib.pyplot as plt

        from .plots import head_heatmap

        fig, axes = plt.subplots(1, len(self.scores), figsize=(4.2 * len(self.scores), 2.8), squeeze=False)
        for ax, (name, result) in zip(axes[0], self.scores.items()):
            head_heatmap(result.effect, title=f"{name}: path-patching score", ax=ax)
        fig.tight_layout()
        return fig


def _select(result: PathPatchingResult, threshold: float) -> list[tuple[int, int]]:
    frame = result.to_frame()
    return sorted((int(r.layer), int(r.head)) for r in frame.itertuples() if r.effect <= -threshold)


def find_entity_circuit(model, clean: EntityBatch, query_corrupt: EntityBatch, binding_corrupt: EntityBatch,
                        threshold: float = 0.1, batch_size: int = 512) -> EntityCircuitSearch:
    """Run the three path-patching searches on ``model`` and return the grouped circuit.

    Parameters
    ----------
    model : nn.Module
        GPT-2 or Llama-family causal LM.
    clean : EntityBatch
        Entity-tracking prompts (``entity_batch``).
    query_corrupt, binding_corrupt : EntityBatch
        ``corrupt_query(clean)`` and ``corrupt_binding(clean)``.
    threshold : float, default=0.1
        A head joins a group when its normalised path score is at most ``-threshold``.
    """
    check_float(threshold, "threshold", "find_entity_circuit", 0.0, 1.0, low_open=True)
    view = _view(model)
    last, prev = clean.roles["last"], clean.roles["previous query label"]
    query_metric = logit_diff(clean.answers, query_corrupt.answers)
    binding_metric = logit_diff(clean.answers, binding_corrupt.answers)
    scores: dict[str, PathPatchingResult] = {}
    scores["value fetcher"] = path_patching(model, clean.ids, query_corrupt.ids, query_metric, receiver_input="logits",
                                            sender_positions=last, batch_size=batch_size)
    fetchers = [h for h in _select(scores["value fetcher"], threshold) if h[0] > 0]
    groups = {"value fetcher": fetchers}
    if fetchers:
        below = [(layer, head) for layer in range(max(ly for ly, _ in fetchers)) for head in range(view.n_heads)]
        scores["query mover"] = path_patching(model, clean.ids, query_corrupt.ids, query_metric, senders=below, receivers=fetchers,
                                              receiver_input="q", sender_positions=last, receiver_positions=last, batch_size=batch_size)
        scores["object mover"] = path_patching(model, clean.ids, binding_corrupt.ids, binding_metric, senders=below,
                                               receivers=fetchers, receiver_input="v", sender_positions=prev,
                                               receiver_positions=prev, batch_size=batch_size)
        groups["query mover"] = _select(scores["query mover"], threshold)
        groups["object mover"] = _select(scores["object mover"], threshold)
    ordered = {name: groups[name] for name in ("object mover", "query mover", "value fetcher") if groups.get(name)}
    if not ordered:
        raise ValueError("find_entity_circuit found no head above the threshold: lower 'threshold' or check the model tracks entities.")
    circuit = Circuit(ordered, {name: GROUP_POSITIONS[name] for name in ordered})
    return EntityCircuitSearch(circuit=circuit, scores=scores, threshold=threshold)


@dataclass
class CircuitCompletion:
    """The completed circuit and the greedy steps behind it (one row per candidate per round)."""

    circuit: Circuit
    steps: pd.DataFrame
    full_accuracy: float
    start_accuracy: float

    @property
    def added(self) -> pd.DataFrame:
        """The candidates that joined, in order, with the circuit-only accuracy after each."""
        return self.steps[self.steps["joined"]].reset_index(drop=True)


def complete_circuit(model, batch: EntityBatch, reference_ids: torch.Tensor, circuit: Circuit,
                     roles: tuple[str, ...] = ("object", "previous query label", "query label", "last"),
                     min_gain: float = 0.1, max_added: int = 4) -> CircuitCompletion:
    """Greedily add the (head, position role) pairs the circuit needs when it runs alone.

    Each round scores every head below the circuit's top layer at every role in ``roles`` (pairs already in
    the circuit excluded) by the circuit-only accuracy with that pair also kept (others mean-ablated over
    ``reference_ids``, as in :func:`evaluate_circuit`). The best pair joins the group
    ``READER_GROUPS[role]`` when its gain is at least ``min_gain * full accuracy``; the search stops
    otherwise or after ``max_added`` pairs. Score on prompts disjoint from those you evaluate on.

    Returns
    -------
    CircuitCompletion
    """
    check_float(min_gain, "min_gain", "complete_circuit", 0.0, 1.0, low_open=True)
    unknown = [r for r in roles if r not in batch.roles or r not in READER_GROUPS]
    if unknown:
        raise ValueError(f"complete_circuit: unknown position roles {unknown}; accepted: {sorted(READER_GROUPS)}.")
    view = _view(model)
    top = max(layer for layer, _ in circuit.heads)
    candidates = [(role, (layer, head)) for role in roles for layer in range(top) for head in range(view.n_heads)]
    groups = {name: list(heads) for name, heads in circuit.groups.items()}
    positions = dict(circuit.positions)
    with torch.no_grad():
        means = mean_head_outputs(model, reference_ids)
        full = float(last_token_accuracy(model(batch.ids).logits, batch.answers).float().mean())

        def accuracy(groups_, positions_) -> float:
            logits = run_circuit(model, batch.ids, Circuit(groups_, positions_), means, batch.roles)
            return float(last_token_accuracy(logits, batch.answers).float().mean())

        start = current = accuracy(groups, positions)
        rows = []
        for round_ in range(max_added):
            scored = []
            for role, head in candidates:
                name = READER_GROUPS[role]
                if any(head in hs and positions.get(g) in (role, None) for g, hs in groups.items()):
                    continue  # already kept at this position
                trial = {**groups, name: [*groups.get(name, []), head]}
                scored.append({"round": round_ + 1, "role": role, "layer": head[0], "head": head[1],
                               "accuracy": accuracy(trial, {**positions, name: role})})
            if not scored:
                break
            frame = pd.DataFrame(scored)
            frame["gain"] = frame["accuracy"] - current
            best = frame["gain"].idxmax()
            frame["joined"] = False
            joins = bool(frame.loc[best, "gain"] >= min_gain * full)
            frame.loc[best, "joined"] = joins
            rows.append(frame)
            if not joins:
                break
            role, head = frame.loc[best, "role"], (int(frame.loc[best, "layer"]), int(frame.loc[best, "head"]))
            groups.setdefault(READER_GROUPS[role], []).append(head)
            positions[READER_GROUPS[role]] = role
            current = float(frame.loc[best, "accuracy"])
    steps = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["round", "role", "layer", "head", "accuracy", "gain", "joined"])
    return CircuitCompletion(Circuit(groups, positions), steps, full, start)
