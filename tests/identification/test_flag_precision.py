"""The share of flags that are wrong labels, estimated from held-out verified predictions and the noise transition."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_repair.identification.flag_precision import estimate_flag_precision

SYMMETRIC_40 = [[0.6, 0.4], [0.4, 0.6]]


def _log(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_precision_and_recall_by_hand():
    """Labels kept with probability 0.6; cut log 0.3. Sample 0's wrong label and sample 2's fall below it (0.4 each),
    sample 3's right label does (0.6): precision 0.8 / 1.4, recall 0.8 / (4 * 0.4)."""
    log_probs = _log([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.25, 0.75]])
    labels = torch.tensor([0, 0, 1, 0])
    estimate = estimate_flag_precision(log_probs, labels, SYMMETRIC_40, math.log(0.3), "probe", seed=0)
    assert estimate.precision == pytest.approx(0.8 / 1.4) and estimate.recall == pytest.approx(0.5)
    assert estimate.source == "probe" and 0 <= estimate.interval[0] <= estimate.interval[1] <= 1
    # one cut per sample (each predicted by its own fold's model): sample 3's right label no longer falls below
    cuts = torch.tensor([math.log(0.3)] * 3 + [math.log(0.2)])
    estimate = estimate_flag_precision(log_probs, labels, SYMMETRIC_40, cuts, "fresh_fold_models", seed=0)
    assert estimate.precision == pytest.approx(1.0) and estimate.recall == pytest.approx(0.5)
    summary = estimate.summary()
    assert summary["estimated_flag_precision"] == estimate.precision
    assert summary["flag_precision_source"] == "fresh_fold_models"


def test_nothing_flagged_gives_no_estimate_and_clean_labels_give_no_recall():
    log_probs = _log([[0.9, 0.1], [0.2, 0.8]])
    labels = torch.tensor([0, 1])
    assert estimate_flag_precision(log_probs, labels, SYMMETRIC_40, -math.inf, "probe", seed=0) is None
    estimate = estimate_flag_precision(log_probs, labels, [[1.0, 0.0], [0.0, 1.0]], math.log(0.95), "probe", seed=0)
    assert estimate.precision == 0.0 and math.isnan(estimate.recall)  # every flag a right label


def _three_gaussian_classes():
    """A fixed reference on three overlapping Gaussian classes: 6,000 training samples with 30% symmetric noise
    flagged by the noise rate's share of lowest given-label log-probabilities, 600 clean verified samples from the
    same distribution. Returns the verified log-probabilities and labels, the cut, and the flags' true precision and
    recall."""
    generator = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def draw(count):
        labels = generator.integers(0, 3, count)
        points = means[labels] + generator.normal(size=(count, 2))
        logits = -0.5 * ((points[:, None, :] - means[None]) ** 2).sum(-1)
        return torch.tensor(logits).log_softmax(-1), labels

    train_log_probs, clean = draw(6000)
    wrong = generator.random(6000) < 0.3
    given_labels = np.where(wrong, (clean + generator.integers(1, 3, 6000)) % 3, clean)
    scores = train_log_probs[np.arange(6000), given_labels].numpy()
    flagged = np.argsort(scores, kind="stable")[: round(0.3 * 6000)]
    verified_log_probs, verified_labels = draw(600)
    return (verified_log_probs, torch.tensor(verified_labels), float(scores[flagged].max()), wrong[flagged].mean(),
            wrong[flagged].sum() / wrong.sum())


def _symmetric(rate):
    return (np.full((3, 3), rate / 2) + np.eye(3) * (1 - 1.5 * rate)).tolist()


def test_the_estimate_finds_the_precision_of_flags_on_data_it_never_saw():
    log_probs, labels, cut, true_precision, true_recall = _three_gaussian_classes()
    estimate = estimate_flag_precision(log_probs, labels, _symmetric(0.3), cut, "probe", seed=0)
    assert abs(estimate.precision - true_precision) < 0.03, (estimate, true_precision)
    assert abs(estimate.recall - true_recall) < 0.03, (estimate, true_recall)
    low, high = estimate.interval
    assert low < true_precision < high and high - low < 0.15  # 600 verified samples: about +-0.05
    # a noise rate known exactly adds nothing to the interval
    assert estimate_flag_precision(log_probs, labels, _symmetric(0.3), cut, "probe", 0, 0.3, (0.3, 0.3)) == estimate


def test_the_noise_rates_uncertainty_widens_the_interval_to_cover_a_rate_estimated_low():
    """At a noise rate estimated at 0.24 for a true 0.30, fewer labels seem wrong and the flags seem less precise:
    the interval at that rate alone misses the truth; with the rate's interval, [0.19, 0.31], it covers it."""
    log_probs, labels, cut, true_precision, _ = _three_gaussian_classes()
    at_the_rate = estimate_flag_precision(log_probs, labels, _symmetric(0.24), cut, "probe", seed=0)
    widened = estimate_flag_precision(log_probs, labels, _symmetric(0.24), cut, "probe", 0, 0.24, (0.19, 0.31))
    assert at_the_rate.interval[1] < true_precision < widened.interval[1]
    assert widened.interval[0] < at_the_rate.interval[0] and widened.precision == at_the_rate.precision


@settings(max_examples=40, deadline=None)
@given(logits=arrays(np.float64, (8, 3), elements=st.floats(-20, 20)),
       labels=arrays(np.int64, (8,), elements=st.integers(0, 2)),
       kept=st.floats(0.0, 1.0), cut=st.floats(-30, 0), rate_interval=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_any_estimate_is_a_share_with_an_ordered_interval(logits, labels, kept, cut, rate_interval):
    transition = np.full((3, 3), (1 - kept) / 2) + np.eye(3) * (kept - (1 - kept) / 2)
    estimate = estimate_flag_precision(torch.tensor(logits).log_softmax(-1), torch.tensor(labels), transition.tolist(),
                                       cut, "probe", 0, 1 - kept, tuple(sorted(rate_interval)))
    if estimate is not None:
        assert 0.0 <= estimate.interval[0] <= estimate.interval[1] <= 1.0
        assert 0.0 <= estimate.precision <= 1.0
        assert math.isnan(estimate.recall) or 0.0 <= estimate.recall <= 1.0


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="log-probabilities and n labels"):
        estimate_flag_precision(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), SYMMETRIC_40, 0.0, "probe", 0)
