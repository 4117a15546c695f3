"""How likely each given label is right: the reference's prediction weighed against the estimated label noise.

A clean reference predicts p(c | x) for a training sample; the noise transition T[c, g] = P(given = g | true = c)
says how labels go wrong. Bayes' rule gives the true class given the sample *and* its given label:
P(true = c | x, g) is proportional to p(c | x) T[c, g]. Where labels are rarely wrong the given label outweighs a
reference that doubts it; where they often are, the reference weighs more. Its value at c = g, the probability
that the given label is right, is what method "auto"'s "reweight" weighs each training sample's loss by: a weak
reference (a text model's) tells corrupted labels apart too poorly for a hard cut to drop the right ones, and a
weight keeps what it is unsure of at the strength it is unsure (measured on text: level with the hard cut,
BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_posterior(reference_log_probs: np.ndarray, given: np.ndarray,
                    transition: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(samples, classes) P(true = c | x, given): the reference's p(c | x) times T[c, given], normalised per sample."""
    log_probs = np.asarray(reference_log_probs, dtype=np.float64)
    given = np.asarray(given, dtype=np.int64)
    transition = np.asarray(transition, dtype=np.float64)
    if log_probs.ndim != 2 or len(log_probs) != len(given):
        raise ValueError(f"reference_log_probs must be (samples, classes) with one row per given label; got shape "
                         f"{log_probs.shape} for {len(given)} labels.")
    classes = log_probs.shape[1]
    if transition.shape != (classes, classes):
        raise ValueError(f"The noise transition is {transition.shape}, but the reference predicts {classes} classes: "
                         f"pass a ({classes}, {classes}) matrix of P(given | true).")
    if len(given) and (given.min() < 0 or given.max() >= classes):
        raise ValueError(f"Given labels must be class ids in [0, {classes}); got {given.min()} to {given.max()}.")
    with np.errstate(divide="ignore"):  # a transition entry of 0 rules that true class out
        joint = log_probs + np.log(transition[:, given].T)
    unexplained = ~np.isfinite(joint).any(axis=1)  # no true class gives this label: it says nothing, the reference does
    joint[unexplained] = log_probs[unexplained]
    joint -= joint.max(axis=1, keepdims=True)
    posterior = np.exp(joint)
    return posterior / posterior.sum(axis=1, keepdims=True)


def label_confidence(reference_log_probs: np.ndarray, given: np.ndarray,
                     transition: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Each sample's probability that its given label is its true class (`label_posterior` at the given label)."""
    given = np.asarray(given, dtype=np.int64)
    return label_posterior(reference_log_probs, given, transition)[np.arange(len(given)), given]
