"""The entity-tracking circuit search on the zoo's base: path patching finds the last-token groups, and the
greedy completion is consistent with an independent circuit-only evaluation."""

from __future__ import annotations

import pytest

import ftanalysis as fta
from ftanalysis.probes import circuits as C


@pytest.fixture(scope="module")
def setting():
    base, tok = fta.zoo.load("gpt2-tiny")
    batch = C.entity_batch(tok, 96, n_boxes=8, split="val", seed=2)
    reference = C.entity_batch(tok, 96, n_boxes=8, split="val", seed=1)
    return base, tok, batch, reference


def test_path_patching_finds_the_query_mover_and_the_value_fetchers(setting):
    base, tok, _, _ = setting
    patch = C.entity_batch(tok, 64, n_boxes=8, split="val")
    search = C.find_entity_circuit(base, patch, C.corrupt_query(patch, tok), C.corrupt_binding(patch, tok), threshold=0.1)
    assert search.circuit.positions["value fetcher"] == "last"
    assert len(search.circuit.groups["value fetcher"]) >= 2 and all(layer == 1 for layer, _ in search.circuit.groups["value fetcher"])
    assert search.circuit.groups["query mover"] and all(layer == 0 for layer, _ in search.circuit.groups["query mover"])


def test_completion_gains_agree_with_evaluate_circuit(setting):
    base, _, batch, reference = setting
    start = C.Circuit({"query mover": [(0, 1)], "value fetcher": [(1, 0), (1, 1), (1, 2)]},
                      {"query mover": "last", "value fetcher": "last"})
    done = C.complete_circuit(base, batch, reference.ids, start, min_gain=0.1)
    added = done.added
    assert len(added) >= 1 and added.loc[0, "role"] == "object"
    assert (added["gain"] >= 0.1 * done.full_accuracy).all()
    last_round = done.steps[done.steps["round"] == done.steps["round"].max()]
    if not last_round["joined"].any():  # the search stopped because no candidate gained enough
        assert (last_round["gain"] < 0.1 * done.full_accuracy).all()
    check = C.evaluate_circuit(base, batch.ids, batch.answers, done.circuit, reference.ids, roles=batch.roles, n_random=0)
    assert check.circuit_accuracy == pytest.approx(float(added["accuracy"].iloc[-1]))
    assert check.full_accuracy == pytest.approx(done.full_accuracy)
    assert C.evaluate_circuit(base, batch.ids, batch.answers, start, reference.ids, roles=batch.roles, n_random=0).circuit_accuracy == \
        pytest.approx(done.start_accuracy)


def test_completion_stops_and_rejects_bad_roles(setting):
    base, _, batch, reference = setting
    start = C.Circuit({"value fetcher": [(1, 0)]}, {"value fetcher": "last"})
    done = C.complete_circuit(base, batch, reference.ids, start, min_gain=1.0)
    assert done.circuit == start and done.added.empty
    with pytest.raises(ValueError, match="unknown position roles"):
        C.complete_circuit(base, batch, reference.ids, start, roles=("object", "nowhere"))
    with pytest.raises(ValueError, match="min_gain"):
        C.complete_circuit(base, batch, reference.ids, start, min_gain=0.0)
