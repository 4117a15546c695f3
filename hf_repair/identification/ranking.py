"""Ranking and flagging per-sample scores (plain numpy, no model): what identification ends with."""

from __future__ import annotations

import math

import numpy as np

from ..config import RepairConfig


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (like scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a positive (e.g. corrupted) sample scores lower than a negative one; ties count half."""
    positives = np.asarray(positives, dtype=bool)
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return math.nan
    ranks = average_ranks(-np.asarray(scores, dtype=np.float64))
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def flag_lowest(score: np.ndarray, config: RepairConfig, noise_rate: float) -> tuple[np.ndarray, float]:
    """The flags of `config.flag_rule` (threshold, budget, or the noise rate's share of lowest scores) and the cut."""
    n = len(score)
    if config.flag_rule == "threshold":
        return score < config.flag_threshold, float(config.flag_threshold)
    if config.flag_rule == "budget":
        count = config.flag_top_k if config.flag_top_k is not None else round(config.flag_fraction * n)
    else:
        count = round(noise_rate * n)
    count = int(min(max(count, 0), n))
    flagged = np.zeros(n, dtype=bool)
    if count == 0:
        return flagged, -math.inf
    order = np.argsort(score, kind="stable")  # ties: lower index first
    flagged[order[:count]] = True
    return flagged, float(score[order[count - 1]])
