"""Expected calibration error with equal-width bins (Guo et al. 2017) and the reliability diagram."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes import calibration, expected_calibration_error, reliability_diagram, task_probabilities


def _numpy_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """An independent loop over right-closed bins (lo, hi]."""
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=generator)  # binary: max prob in [0.5, 1]
    predicted = torch.randint(0, 2, (n,), generator=generator)
    right = torch.rand(n, generator=generator) < confidence  # right with probability = confidence
    labels = torch.where(right, predicted, 1 - predicted)
    probs = torch.stack([torch.where(predicted == 0, confidence, 1 - confidence), torch.where(predicted == 1, confidence, 1 - confidence)], 1)
    result = expected_calibration_error(probs, labels)
    assert result.ece < 0.005
    assert result.accuracy == pytest.approx(float(confidence.mean()), abs=0.005)


def test_overconfident_predictor_hand_computed():
    # always 90% sure, right 6 times out of 10: ECE = |0.6 - 0.9| = 0.3
    probs = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)
    result = expected_calibration_error(probs, labels)
    assert result.ece == pytest.approx(0.3) and result.mce == pytest.approx(0.3)
    # two bins: confidences 0.95 (right) and 0.65, 0.65 (one right) -> (1/3)*0.05 + (2/3)*|0.5 - 0.65| = 0.11667
    probs = torch.tensor([[0.95, 0.05], [0.35, 0.65], [0.65, 0.35]])
    result = expected_calibration_error(probs, torch.tensor([0, 1, 1]), n_bins=10)
    assert result.ece == pytest.approx(0.05 / 3 + 2 / 3 * 0.15)
    assert result.bins["count"].sum() == 3 and len(result.bins) == 10


def test_matches_an_independent_loop_and_bins_are_right_closed():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 4, generator=generator) * 2
    probs = torch.softmax(logits, -1)
    labels = torch.randint(0, 4, (3000,), generator=generator)
    for n_bins in (1, 5, 15):
        ours = expected_calibration_error(probs, labels, n_bins=n_bins).ece
        conf, pred = probs.max(1)
        assert ours == pytest.approx(_numpy_ece(conf.double().numpy(), (pred == labels).double().numpy(), n_bins), abs=1e-9)
    # a confidence of exactly 0.5 with two bins belongs to (0, 0.5]
    result = expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), n_bins=2)
    assert result.bins["count"].tolist() == [1, 0]


def test_one_dimensional_binary_probabilities():
    p1 = torch.tensor([0.8, 0.3, 0.6])
    a = expected_calibration_error(p1, torch.tensor([1, 0, 0]))
    b = expected_calibration_error(torch.stack([1 - p1, p1], 1), torch.tensor([1, 0, 0]))
    assert a.ece == pytest.approx(b.ece)


def test_bad_input():
    with pytest.raises(ValueError, match="'n_bins'"):
        expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), n_bins=0)
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(torch.tensor([[0.9, 0.9]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(TypeError, match="CalibrationResult"):
        reliability_diagram([])


def test_reliability_diagram_figure():
    probs = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)
    a = expected_calibration_error(probs, labels, label="a")
    b = expected_calibration_error(probs, torch.zeros(10, dtype=torch.long), label="b")
    fig = reliability_diagram([a, b], title="test")
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # the diagonal and one line per result
    assert any("ECE 0.300" in t.get_text() for t in ax.get_legend().get_texts())
    assert isinstance(a.plot(), matplotlib.figure.Figure)
    assert list(a.to_frame()["label"].unique()) == ["a"]


def test_language_model_task_scores_the_first_answer_token(tok):
    model = make_tiny("gpt2")
    task = fta.tasks.make("counting", max_count=3)  # single-token answers
    probs, labels = task_probabilities(model, tok, task, n=64)
    assert probs.shape == (64, model.config.vocab_size) and labels.shape == (64,)
    assert torch.allclose(probs.sum(1), torch.ones(64), atol=1e-5)
    assert labels.tolist() == [tok.convert_tokens_to_ids(e.answer) for e in task.examples(64)]
    accuracy = task.evaluate(model, tok, n=64)["accuracy"]
    assert calibration(model, tok, task, n=64).accuracy == pytest.approx(accuracy)
