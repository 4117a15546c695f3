"""The calibrated noise-rate estimate on synthetic predictions whose truth is known exactly."""

import numpy as np
import pytest
import torch

from hf_repair.identification.noise_rate import (
    NoiseRateCalibration,
    _tempered,
    summarise_noise_rate,
    symmetric_transition,
)

CLASSES = 4
# The reference's expected prediction for each true class: class-dependent mistakes (0 is often taken for 1),
# which the symmetric correction (d - e) / (1 - e - e / (C - 1)) does not model.
CONFUSION = torch.tensor([
    [0.60, 0.30, 0.05, 0.05],
    [0.05, 0.85, 0.05, 0.05],
    [0.05, 0.05, 0.80, 0.10],
    [0.02, 0.02, 0.06, 0.90],
], dtype=torch.float64)


def _predictions(true, confusion, seed):
    """Per-sample probabilities that vary around confusion[true] (Dirichlet) and average to it."""
    generator = np.random.default_rng(seed)
    rows = np.stack([generator.dirichlet(5 * confusion[t].numpy()) for t in true]) + 1e-9
    return torch.as_tensor(rows / rows.sum(1, keepdims=True)).log()


def _calibration(heldout_true, seed=0):
    return NoiseRateCalibration("probe", _predictions(heldout_true, CONFUSION, seed), torch.as_tensor(heldout_true),
                                CLASSES)


def _noisy_training_set(size, seed):
    """True labels, and given labels with 30% of class 0 flipped to 1 and 10% of class 2 to 3."""
    generator = np.random.default_rng(seed)
    true = generator.integers(0, CLASSES, size)
    flip = generator.random(size)
    given = true.copy()
    given[(true == 0) & (flip < 0.3)] = 1
    given[(true == 2) & (flip < 0.1)] = 3
    return true, given


def test_class_dependent_noise_and_reference_mistakes_are_recovered():
    heldout_true = np.repeat(np.arange(CLASSES), 400)
    true, given = _noisy_training_set(20000, seed=1)
    calibration = _calibration(heldout_true)
    for chunk in np.array_split(np.arange(len(true)), 7):  # batch by batch, as the training pass feeds it
        calibration.update(_predictions(true[chunk], CONFUSION, seed=int(chunk[0])), torch.as_tensor(given[chunk]))
    estimate = calibration.estimate(torch.device("cpu"), seed=0)
    truth = float(np.mean(true != given))

    assert estimate.rate == pytest.approx(truth, abs=0.02)
    low, high = estimate.interval
    assert low < truth < high and high - low < 0.06
    assert estimate.confidence_matched == pytest.approx(estimate.raw, abs=0.01)
    assert estimate.problems() == []
    # The symmetric correction of the raw disagreement is off by several points on the same predictions.
    heldout_error = 1 - float((CONFUSION.diagonal() / CONFUSION.sum(1)).mean())
    disagreement = float(np.mean(np.argmax(np.stack([CONFUSION[t].numpy() for t in true]), 1) != given))
    symmetric = (disagreement - heldout_error) / (1 - heldout_error - heldout_error / (CLASSES - 1))
    assert abs(symmetric - truth) > 0.05


def test_the_noise_transition_is_recovered_row_by_row():
    """P(given | true): 30% of class 0 given as 1, 10% of class 2 as 3, the other classes clean."""
    heldout_true = np.repeat(np.arange(CLASSES), 400)
    true, given = _noisy_training_set(20000, seed=1)
    calibration = _calibration(heldout_true)
    calibration.update(_predictions(true, CONFUSION, seed=5), torch.as_tensor(given))
    transition = np.array(calibration.estimate(torch.device("cpu"), seed=0).transition)
    expected = np.eye(CLASSES)
    expected[0, :2] = [0.7, 0.3]
    expected[2, 2:] = [0.9, 0.1]
    assert (transition >= 0).all() and np.allclose(transition.sum(1), 1.0)
    assert np.abs(transition - expected).max() < 0.05, transition


def test_without_a_probe_the_transition_spreads_the_estimated_rate_evenly():
    assert summarise_noise_rate({}, np.array([-1.0, 1.0, 2.0, 3.0]), num_classes=2).transition == [[0.75, 0.25],
                                                                                                  [0.25, 0.75]]
    transition = np.array(symmetric_transition(0.3, 4))
    assert np.allclose(transition.diagonal(), 0.7) and np.allclose(transition.sum(1), 1.0)
    assert transition[0, 1] == pytest.approx(0.1)


def test_a_reference_sharper_on_training_samples_than_held_out_is_reported_unreliable():
    """Memorisation: on training samples the reference leans towards the given label, more than held-out
    predictions of the same true class do; the estimate drops and the two calibrations disagree."""
    heldout_true = np.repeat(np.arange(CLASSES), 400)
    true, given = _noisy_training_set(20000, seed=1)
    calibration = _calibration(heldout_true)
    memorised = 0.6 * CONFUSION[true] + 0.4 * torch.eye(CLASSES, dtype=torch.float64)[given]
    calibration.update(memorised.log(), torch.as_tensor(given))
    estimate = calibration.estimate(torch.device("cpu"), seed=0)
    truth = float(np.mean(true != given))

    assert estimate.rate < truth - 0.05
    problems = estimate.problems()
    assert any("sees training samples differently from held-out ones" in p for p in problems), problems
    summary = summarise_noise_rate({"probe": estimate}, influence_mean=np.zeros(len(true)), num_classes=CLASSES)
    assert summary.source == "probe_disagreement" and summary.warning is not None


def test_agreeing_with_the_given_labels_beyond_held_out_accuracy_is_reported_impossible():
    heldout_true = np.repeat(np.arange(CLASSES), 400)
    true, given = _noisy_training_set(20000, seed=1)
    calibration = _calibration(heldout_true)
    parroting = 0.95 * torch.eye(CLASSES, dtype=torch.float64)[given] + 0.05 / CLASSES
    calibration.update(parroting.log(), torch.as_tensor(given))
    estimate = calibration.estimate(torch.device("cpu"), seed=0)
    assert estimate.raw < 0 and estimate.rate == 0.0 and estimate.outside_share > 0.975
    assert any("not explained by its held-out confusion" in p for p in estimate.problems())


def test_small_verified_split_gives_a_wide_interval_and_says_so():
    heldout_true = np.repeat(np.arange(CLASSES), 6)
    true, given = _noisy_training_set(5000, seed=2)
    calibration = _calibration(heldout_true, seed=3)
    calibration.update(_predictions(true, CONFUSION, seed=4), torch.as_tensor(given))
    estimate = calibration.estimate(torch.device("cpu"), seed=0)
    low, high = estimate.interval
    assert high - low > 0.1
    assert any("wider than" in p for p in estimate.problems())


def test_without_a_probe_the_negative_influence_share_is_used_and_flagged_as_rough():
    influence = np.array([-1.0, 2.0, 0.5, -0.1, 3.0, 1.0, 2.0, 0.1])
    summary = summarise_noise_rate({}, influence, num_classes=2)
    assert summary.source == "negative_influence" and summary.rate == 0.25
    assert summary.interval[0] < 0.25 < summary.interval[1]
    assert "no probe" in summary.warning


def test_tempering_reaches_the_requested_confidence():
    log_probs = _predictions(np.repeat(np.arange(CLASSES), 50), CONFUSION, seed=0)
    for target in (0.5, 0.75, 0.95):
        tempered = _tempered(log_probs, target)
        assert float(tempered.exp().max(-1).values.mean()) == pytest.approx(target, abs=1e-6)
        assert torch.equal(tempered.argmax(-1), log_probs.argmax(-1))  # a temperature keeps every prediction
