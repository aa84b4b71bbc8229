"""Lab 02's checks pass on the library's reference, fail on known-wrong mutants with their hint, read a stub as
"not implemented" (tested for every lab in test_labs_checks.py); here: bad arguments, and the references agree with hand-worked cases and a
numpy recomputation."""

from __future__ import annotations

import pytest
import torch

from ftanalysis.labs.checks import intruders as checks


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a function"):
        checks.check_max_cosine(torch.eye(3))
    with pytest.raises(TypeError, match="lacks \\['eps'\\]"):
        checks.check_count_intruders(lambda W0, W1, k: 0)


# ---------------------------------------------------------------------- independent oracles
def test_planted_cases_cover_zero_and_several_intruders():
    counts = []
    for case in checks._cases():
        W0, W1 = checks._matrices(case)
        counts.append(checks.reference_count_intruders(W0, W1, case["k"], 0.5))
    assert 0 in counts and max(counts) >= 2


def test_hand_worked_intruder():
    # W0 = diag(3 .. 1) has the standard basis as left singular vectors. Adding 10 u e1^T with u spread evenly over
    # the 16 coordinates makes the new top singular vector close to u, whose |cos| with every basis vector is
    # 1/4 < 0.5: one intruder, at rank 1; W0 against itself has none.
    W0 = torch.diag(torch.linspace(3, 1, 16))
    u = torch.ones(16) / 4
    v = torch.zeros(16)
    v[0] = 1
    W1 = W0 + 10 * torch.outer(u, v)
    max_cos = checks.reference_max_cosine(W0, W1, 3)
    assert max_cos[0] < 0.5 and checks.reference_count_intruders(W0, W1, 3, 0.5) == 1
    assert checks.reference_count_intruders(W0, W0.clone(), 3, 0.5) == 0


def test_reference_scale_direction_removes_and_keeps():
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(checks.reference_scale_direction(W, 0, 1.0), W)
    removed = torch.linalg.svdvals(checks.reference_scale_direction(W, 0, 0.0))
    torch.testing.assert_close(removed[:-1], S[1:], atol=1e-5, rtol=1e-5)
    assert removed[-1] < 1e-5


def test_reference_agrees_with_a_numpy_recomputation():
    """The definition (top-k left singular vectors of W1, max |cos| against all of W0's) recomputed with numpy."""
    import numpy as np

    W0, W1 = checks.planted(48, 48, 2, 2, seed=5)
    U0, _, _ = np.linalg.svd(W0.double().numpy())
    U1, _, _ = np.linalg.svd(W1.double().numpy())
    max_cos = np.abs(U1[:, :10].T @ U0).max(axis=1)
    torch.testing.assert_close(checks.reference_max_cosine(W0, W1, 10), torch.tensor(max_cos, dtype=torch.float32), atol=1e-4, rtol=1e-3)
