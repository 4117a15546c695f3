"""The probability that a given label is right: the reference's prediction through the estimated noise transition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_repair.identification import label_confidence, label_posterior


def test_binary_posterior_is_bayes_rule_by_hand():
    """Reference 0.7 / 0.3, labels kept with probability 0.6: given 0, 0.7 * 0.6 against 0.3 * 0.4; given 1,
    0.7 * 0.4 against 0.3 * 0.6."""
    log_probs = np.log([[0.7, 0.3], [0.7, 0.3]])
    transition = [[0.6, 0.4], [0.4, 0.6]]
    posterior = label_posterior(log_probs, np.array([0, 1]), transition)
    np.testing.assert_allclose(posterior[0], [0.42 / 0.54, 0.12 / 0.54])
    np.testing.assert_allclose(posterior[1], [0.28 / 0.46, 0.18 / 0.46])
    np.testing.assert_allclose(label_confidence(log_probs, np.array([0, 1]), transition), [0.42 / 0.54, 0.18 / 0.46])


def test_clean_labels_are_believed_and_uninformative_labels_leave_the_reference():
    log_probs = np.log([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    given = np.array([0, 2])
    np.testing.assert_allclose(label_confidence(log_probs, given, np.eye(3)), [1.0, 1.0])
    np.testing.assert_allclose(label_posterior(log_probs, given, np.full((3, 3), 1 / 3)), np.exp(log_probs))


def test_a_label_no_true_class_gives_leaves_the_reference():
    """A transition column of zeros (no true class is ever given that label) carries no evidence: the posterior is
    the reference's own distribution, not NaN."""
    transition = np.array([[1.0, 0.0], [1.0, 0.0]])
    log_probs = np.log([[0.3, 0.7]])
    np.testing.assert_allclose(label_posterior(log_probs, np.array([1]), transition), [[0.3, 0.7]])


@settings(max_examples=50, deadline=None)
@given(logits=arrays(np.float64, (6, 4), elements=st.floats(-30, 30)),
       raw=arrays(np.float64, (4, 4), elements=st.floats(0, 1)),
       given_labels=arrays(np.int64, 6, elements=st.integers(0, 3)))
def test_every_posterior_is_a_distribution_and_more_belief_in_a_label_raises_its_confidence(logits, raw, given_labels):
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    transition = raw + np.eye(4)  # every class keeps its label sometimes
    transition /= transition.sum(1, keepdims=True)
    posterior = label_posterior(log_probs, given_labels, transition)
    assert np.all(np.isfinite(posterior)) and np.all(posterior >= 0)
    np.testing.assert_allclose(posterior.sum(1), 1.0)
    # the reference more sure of each given label, the other classes lowered in proportion
    rows = np.arange(len(given_labels))
    p = np.exp(log_probs)
    boosted = (p[rows, given_labels] + 1) / 2
    scale = (1 - boosted) / np.clip(1 - p[rows, given_labels], 1e-300, None)
    surer_p = p * scale[:, None]
    surer_p[rows, given_labels] = boosted
    with np.errstate(divide="ignore"):
        surer = np.log(surer_p)
    before = label_confidence(log_probs, given_labels, transition)
    after = label_confidence(surer, given_labels, transition)
    assert np.all(after >= before - 1e-9)


@pytest.mark.parametrize("log_probs, given_labels, transition, message", [
    (np.zeros((3, 2)), np.array([0, 1]), np.eye(2), "one row per given label"),
    (np.zeros((2, 2)), np.array([0, 1]), np.eye(3), r"pass a \(2, 2\) matrix"),
    (np.zeros((2, 2)), np.array([0, 2]), np.eye(2), r"class ids in \[0, 2\)"),
])
def test_bad_shapes_and_labels_are_refused_with_what_to_fix(log_probs, given_labels, transition, message):
    with pytest.raises(ValueError, match=message):
        label_posterior(log_probs, given_labels, transition)
