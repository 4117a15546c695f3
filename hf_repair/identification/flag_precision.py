"""What share of the flags are wrong labels: estimated without knowing which labels are wrong.

A sample is flagged when its score, the given label's log-probability under a clean reference, falls at or
below a cut. A verified sample the reference did not learn stands for a training sample of its true class: with
its true label it shows how often a right label falls below the cut, and with each other label, weighed by the
estimated noise transition P(given | true), how often a wrong one does. Over the verified samples,

    precision = sum_i sum_{g != y_i} T[y_i, g] [s_i(g) <= cut] / sum_i sum_g T[y_i, g] [s_i(g) <= cut]
    recall    = sum_i sum_{g != y_i} T[y_i, g] [s_i(g) <= cut] / sum_i (1 - T[y_i, y_i])

It holds where the reference sees training samples as it sees the held-out verified ones (the noise rate's
calibration assumes the same, and its warning says when it does not), and takes the verified split's class mix
for the training set's. Measured on the fine-tuning benchmark's text task (BENCHMARKS.md), precision is what a
small verified split limits: it tells a user when verifying more labels is what would sharpen the flags.

The interval is a bootstrap over the verified samples at the estimated transition (the noise rate's own
uncertainty, `estimated_noise_rate_interval`, is not in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .noise_rate import BOOTSTRAP_REPLICATES, INTERVAL_LEVEL

# The identification summary's keys for an estimate (`FlagPrecisionEstimate.summary`).
FLAG_PRECISION_KEYS = ("estimated_flag_precision", "estimated_flag_precision_interval", "estimated_flag_recall",
                       "flag_precision_source")


@dataclass
class FlagPrecisionEstimate:
    """The estimated share of flags that are wrong labels, its interval, and the share of wrong labels flagged."""

    precision: float
    interval: tuple[float, float]  # INTERVAL_LEVEL percentile bootstrap over the verified samples
    recall: float
    source: str  # the held-out predictions it reads: "probe", "refit" or "fresh_fold_models"

    def summary(self) -> dict[str, object]:
        """The identification summary's entries for it."""
        values = (self.precision, list(self.interval), self.recall, self.source)
        return dict(zip(FLAG_PRECISION_KEYS, values, strict=True))


def estimate_flag_precision(heldout_log_probs: torch.Tensor, labels: torch.Tensor, transition: list[list[float]],
                            cuts: torch.Tensor | float, source: str, seed: int) -> FlagPrecisionEstimate | None:
    """The estimate from verified samples' held-out log-probabilities (n, C), their labels (n,), the noise
    transition [true][given] and the cut each sample is flagged below (one, or one per sample where each was
    predicted by its own fold's model); None when no verified sample falls below the cut under any label the
    transition gives (recall is NaN when the transition gives no wrong label)."""
    log_probs = heldout_log_probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(f"Expected (n, classes) log-probabilities and n labels, got shapes "
                         f"{tuple(log_probs.shape)} and {tuple(labels.shape)}.")
    given_by_true = torch.as_tensor(transition, dtype=torch.float64)[labels]  # (n, C): P(given = g | true = y_i)
    below = log_probs <= torch.as_tensor(cuts, dtype=torch.float64).reshape(-1, 1)
    right = torch.nn.functional.one_hot(labels, log_probs.shape[1]).bool()
    # per sample: expected wrong-and-flagged, right-and-flagged, and wrong labels
    parts = torch.stack([(given_by_true * (below & ~right)).sum(1), (given_by_true * (below & right)).sum(1),
                         (given_by_true * ~right).sum(1)], dim=1)
    precision, recall = _ratios(parts.sum(0))
    if math.isnan(precision):
        return None
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(labels), (BOOTSTRAP_REPLICATES, len(labels)), generator=generator)
    replicates = torch.tensor([_ratios(parts[r].sum(0))[0] for r in rows], dtype=torch.float64)
    replicates = replicates[~replicates.isnan()]
    tail = (1 - INTERVAL_LEVEL) / 2
    low, high = (torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
                 if len(replicates) else (precision, precision))
    return FlagPrecisionEstimate(precision=precision, interval=(low, high), recall=recall, source=source)


def _ratios(totals: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) from summed (wrong and flagged, right and flagged, wrong); NaN where undefined."""
    wrong_flagged, right_flagged, wrong = totals.tolist()
    flagged = wrong_flagged + right_flagged
    return (wrong_flagged / flagged if flagged > 0 else math.nan, wrong_flagged / wrong if wrong > 0 else math.nan)
