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

The interval is a bootstrap over the verified samples. Where the noise rate's interval is given, each replicate
also draws a noise rate from it (a normal on either side of the estimate, with the interval's half-widths) and scales
the transition's wrong labels to it, keeping which classes they go to: a precision leans on how many labels are
wrong. The two draws are independent, which errs wide: the same verified samples pull both the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .noise_rate import BOOTSTRAP_REPLICATES, INTERVAL_LEVEL, normal_quantile

# The identification summary's keys for an estimate (`FlagPrecisionEstimate.summary`).
FLAG_PRECISION_KEYS = ("estimated_flag_precision", "estimated_flag_precision_interval", "estimated_flag_recall",
                       "flag_precision_source")


@dataclass
class FlagPrecisionEstimate:
    """The estimated share of flags that are wrong labels, its interval, and the share of wrong labels flagged."""

    precision: float
    interval: tuple[float, float]  # INTERVAL_LEVEL percentile bootstrap (verified samples, noise rate)
    recall: float
    source: str  # the held-out predictions it reads: "probe", "refit" or "fresh_fold_models"

    def summary(self) -> dict[str, object]:
        """The identification summary's entries for it."""
        values = (self.precision, list(self.interval), self.recall, self.source)
        return dict(zip(FLAG_PRECISION_KEYS, values, strict=True))


def estimate_flag_precision(heldout_log_probs: torch.Tensor, labels: torch.Tensor, transition: list[list[float]],
                            cuts: torch.Tensor | float, source: str, seed: int, noise_rate: float | None = None,
                            noise_rate_interval: tuple[float, float] | None = None) -> FlagPrecisionEstimate | None:
    """The estimate from verified samples' held-out log-probabilities (n, C), their labels (n,), the noise
    transition [true][given] and the cut each sample is flagged below (one, or one per sample where each was
    predicted by its own fold's model); the noise rate the transition comes from, with its interval, widens the
    interval by its uncertainty. None when no verified sample falls below the cut under any label the transition
    gives (recall is NaN when the transition gives no wrong label)."""
    log_probs = heldout_log_probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(f"Expected (n, classes) log-probabilities and n labels, got shapes "
                         f"{tuple(log_probs.shape)} and {tuple(labels.shape)}.")
    given_by_true = torch.as_tensor(transition, dtype=torch.float64)[labels]  # (n, C): P(given = g | true = y_i)
    below = log_probs <= torch.as_tensor(cuts, dtype=torch.float64).reshape(-1, 1)
    right = torch.nn.functional.one_hot(labels, log_probs.shape[1]).bool()
    # per sample: the expected wrong-and-flagged and wrong labels, and whether its right label falls below the cut.
    # Scaling the transition's wrong labels by s scales the first two by s and the right label's weight 1 - w to 1 - s w.
    wrong_flagged = (given_by_true * (below & ~right)).sum(1)
    wrong = (given_by_true * ~right).sum(1)
    right_below = (below & right).any(1).double()
    precision, recall = _ratios(wrong_flagged.sum(), ((1 - wrong) * right_below).sum(), wrong.sum())
    if math.isnan(precision):
        return None
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(labels), (BOOTSTRAP_REPLICATES, len(labels)), generator=generator)
    scales = _rate_scales(noise_rate, noise_rate_interval, float(wrong.max()), generator)
    replicates, _ = _ratios(scales * wrong_flagged[rows].sum(1),
                            right_below[rows].sum(1) - scales * (wrong * right_below)[rows].sum(1),
                            scales * wrong[rows].sum(1))
    replicates = replicates[~replicates.isnan()].clamp(0.0, 1.0)  # rounding at a scale's cap
    tail = (1 - INTERVAL_LEVEL) / 2
    low, high = (torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
                 if len(replicates) else (precision, precision))
    return FlagPrecisionEstimate(precision=float(precision), interval=(low, high), recall=float(recall), source=source)


def _rate_scales(rate: float | None, interval: tuple[float, float] | None, most_wrong: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Per replicate, a noise rate drawn from `interval` over `rate`, as a share of `rate`, capped where the class
    with the most wrong labels (`most_wrong`) would keep no right one; ones without a rate and interval."""
    if rate is None or interval is None or rate <= 0:
        return torch.ones(BOOTSTRAP_REPLICATES, dtype=torch.float64)
    draws = torch.randn(BOOTSTRAP_REPLICATES, generator=generator, dtype=torch.float64)
    low, high = interval
    spread = torch.where(draws > 0, max(high - rate, 0.0), max(rate - low, 0.0)) / normal_quantile(INTERVAL_LEVEL)
    return ((rate + draws * spread).clamp_min(0.0) / rate).clamp(max=1.0 / max(most_wrong, 1e-12))


def _ratios(wrong_flagged: torch.Tensor, right_flagged: torch.Tensor,
            wrong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(precision, recall) from summed wrong-and-flagged, right-and-flagged and wrong labels; NaN where undefined."""
    flagged = wrong_flagged + right_flagged
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return (torch.where(flagged > 0, wrong_flagged / flagged.clamp_min(1e-300), nan),
            torch.where(wrong > 0, wrong_flagged / wrong.clamp_min(1e-300), nan))
