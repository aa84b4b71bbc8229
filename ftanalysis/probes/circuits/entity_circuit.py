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

A head joins a group when its normalised path-patching score is at most ``-threshold`` (the score is
``(patched - clean) / (clean - corrupt)``: -1 means the path carries the whole effect). Prakash et al. keep
the top-k heads per group of LLaMA-7B's 1,024; with a few heads a threshold is the natural choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..._validation import check_float
from .circuit import Circuit
from .entity import EntityBatch
from .hooks import _view
from .metrics import logit_diff
from .path_patching import PathPatchingResult, path_patching

GROUP_POSITIONS = {"object mover": "previous query label", "query mover": "last", "value fetcher": "last"}


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

        fig, axes = plt.subplots(1, len(self.scores), figsize=(4.2 * len(self.scores), 2.8))
        for ax, (name, result) in zip(axes, self.scores.items()):
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
