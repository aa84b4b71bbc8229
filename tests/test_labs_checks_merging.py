"""Lab 05's checks pass on the library's reference, fail on known-wrong mutants with their hint, read a stub as
"not implemented" (tested for every lab in test_labs_checks.py); here: bad arguments, and the references agree with PEFT's merge utilities and a hand-worked example."""

from __future__ import annotations

import pytest
import torch

from ftanalysis.labs.checks import merging as checks


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_ties_merge("ties")
    with pytest.raises(TypeError, match="lacks \\['lam'\\]"):
        checks.check_ties_merge(lambda taus, k: None)


# ---------------------------------------------------------------------- independent oracles
def test_reference_ties_matches_peft_merge_utils():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    for seed, (tasks, n, k) in enumerate([(3, 90, 0.5), (2, 60, 0.3), (4, 120, 1.0)]):
        taus = checks.conflicting_vectors(tasks, n, seed=seed)
        expected = merge_utils.ties(list(taus), torch.ones(tasks), density=k, majority_sign_method="total")
        torch.testing.assert_close(checks.reference_ties_merge(taus, k, 1.0), expected)
        torch.testing.assert_close(checks.reference_trim(taus[0], k), merge_utils.prune(taus[0], k, "magnitude"))


def test_reference_ties_hand_worked_example():
    # entry 0: +1, +3 -> sign +, mean 2; entry 1: -2, +1 -> mass -1, only -2 agrees, so -2 (a plain mean
    # would give -0.5); entry 2: +0.5, -0.5 -> a tie, broken by the majority sign (+). With k = 2/3 each task
    # keeps its 2 largest entries, so both 0.5s are trimmed and entry 2 becomes 0.
    taus = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])
    assert checks.reference_ties_merge(taus, 1.0, 1.0).tolist() == [2.0, -2.0, 0.5]
    assert checks.reference_ties_merge(taus, 2 / 3, 1.0).tolist() == [2.0, -2.0, 0.0]


def test_planted_conflicts_separate_mass_from_majority():
    taus = checks.conflicting_vectors(3, 90, seed=0)
    mass, count = torch.sign(taus.sum(0)), torch.sign(torch.sign(taus).sum(0))
    assert (mass != count).sum() >= 20  # the planted third of the entries


def test_reference_dare_is_unbiased_and_drops_p():
    tau = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    out = checks.reference_dare(tau, 0.9, torch.Generator().manual_seed(1))
    assert abs(float((out == 0).float().mean()) - 0.9) < 0.03
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept] / 0.1)
