"""What identification returns: the per-sample table (scores, suggested labels, flags) and the summary."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from ..config import RepairConfig
from ..data import column_array
from .flag_precision import estimate_flag_precision
from .noise_rate import NoiseRateEstimate, summarise_noise_rate
from .ranking import auroc, average_ranks, flag_lowest
from .training_pass import FIELDS
from .verified_pass import VerifiedPass

logger = logging.getLogger(__name__)


@dataclass
class IdentificationResult:
    """Returned by `identify_harmful` / `Repairer.identify`.

    `table` has one row per training sample in dataset order: `index`, `score` (lower = more harmful),
    `given_label`, `suggested_label`, `flagged`, `is_corrupted` (when the training set has it) and one
    column per score that was computed (`probe`, `influence` and `loss` always where the model allows them,
    `refit` and `projection` when asked for). `summary` holds the counts, the flag rule and its threshold,
    the score's name, the estimated noise rate with its interval (`estimated_noise_rate_interval`) and a
    `noise_rate_warning` (None, or why the estimate should not be trusted), the estimated label noise
    `noise_transition[true][given]` = P(given | true) (method "auto"'s "forward" learns through it), the
    classes the verified split lacks (`blind_classes`), timings, and precision / recall / AUROC when the
    training set has `is_corrupted`. Without it, `estimated_flag_precision` (with its interval and
    `estimated_flag_recall`, `flag_precision.py`) says what share of the flags are likely wrong labels, where the
    score is a clean reference's (the probe or the refit).

    Example:
        >>> ident = Repairer(model, RepairConfig()).identify(train_dataset, verified)
        >>> ident.table.to_pandas().sort_values("score").head()  # the most harmful samples first
        >>> cleaned = train_dataset.select(np.setdiff1d(np.arange(len(train_dataset)), ident.flagged_indices))
    """

    table: datasets.Dataset
    summary: dict[str, Any]
    flagged_indices: np.ndarray
    # (samples, classes) log-probabilities under the reference that suggests labels, when asked for
    # (`identify_harmful(keep_reference_log_probs=True)`): what `label_posterior` weighs the given labels by
    reference_log_probs: np.ndarray | None = None

    def __repr__(self) -> str:
        s = self.summary
        text = (
            f"IdentificationResult(score={s['score']!r}, num_samples={s['num_samples']}, num_flagged={s['num_flagged']}, "
            f"flag_rule={s['flag_rule']!r}, estimated_noise_rate={s['estimated_noise_rate']:.4f}"
        )
        if s.get("noise_rate_warning"):
            text += " (unreliable)"
        if "estimated_flag_precision" in s:
            text += f", estimated_flag_precision={s['estimated_flag_precision']:.4f}"
        if "auroc" in s:
            text += f", precision={s['precision']:.4f}, recall={s['recall']:.4f}, auroc={s['auroc']:.4f}"
        return text + ")"


def build_result(values: np.ndarray, noise_rates: dict[str, NoiseRateEstimate], labels: np.ndarray,
                 dataset: datasets.Dataset, scorer: VerifiedPass, config: RepairConfig, score_name: str,
                 components: list[str], timings: dict[str, float]) -> IdentificationResult:
    column = {name: values[:, i] for i, name in enumerate(FIELDS)}
    available = {"influence": column["influence"], "loss": column["loss"]}
    if scorer.refit is not None:
        available["refit"] = column["refit"]
    if scorer.probe is not None:
        available["probe"] = column["probe"]
    if not np.isnan(column["projection"]).all():
        available["projection"] = column["projection"]
    n = len(labels)
    if score_name == "combined":
        score = np.mean([average_ranks(available[name]) / n for name in components], axis=0)
    else:
        score = available[score_name]

    if scorer.probe is not None:
        suggested = column["probe_prediction"]
    elif scorer.refit is not None:
        suggested = column["refit_prediction"]
    elif "projection" in available:
        suggested = column["projection_prediction"]
    else:
        suggested = column["prediction"]
    suggested = suggested.astype(np.int64)
    noise = summarise_noise_rate(noise_rates, column["influence_mean"], scorer.num_classes)
    flagged, threshold = flag_lowest(score, config, noise.rate)

    table: dict[str, Any] = {
        "index": np.arange(n, dtype=np.int64),
        "score": score.astype(np.float64),
        "given_label": labels,
        "suggested_label": suggested,
        "flagged": flagged,
    }
    corrupted = None
    if "is_corrupted" in dataset.column_names:
        corrupted = column_array(dataset, "is_corrupted").astype(bool)
        table["is_corrupted"] = corrupted
    for name, value in available.items():
        table[name] = value.astype(np.float64)

    summary: dict[str, Any] = {
        "num_samples": n,
        "num_flagged": int(flagged.sum()),
        "flag_rule": config.flag_rule,
        "threshold": threshold,
        "score": score_name,
        "estimated_noise_rate": noise.rate,
        "estimated_noise_rate_interval": list(noise.interval),
        "noise_rate_source": noise.source,
        "noise_rate_estimates": noise.estimates,
        "noise_rate_warning": noise.warning,
        "noise_transition": noise.transition,
        "blind_classes": list(scorer.blind_classes),
        "num_verified": scorer.num_verified,
        "influence_layers": [layer.name for layer in scorer.layers],
        "closed_form": [layer.name for layer in scorer.layers if layer.closed_form],
        "preconditioner": {name: ("exact" if stats.exact else "kfac") if config.preconditioner != "identity" else "identity"
                           for name, stats in scorer.influence.stats.items()},
        "damping": config.damping,
        "trained_verified_accuracy": scorer.verified_accuracy,
        **timings,
        "samples_per_second": n / timings["identify_time_s"],
        "train_pass_samples_per_second": n / timings["train_pass_s"],
    }
    if scorer.probe is not None:
        summary["probe_layer"] = scorer.probe_layer[0]
        summary["probe_l2"] = scorer.probe.l2
        summary["probe_heldout_accuracy"] = scorer.probe.heldout_accuracy
    if scorer.refit is not None:
        summary["refit_prox"] = scorer.refit.prox
        summary["refit_heldout_accuracy"] = scorer.refit.heldout_accuracy
    reference = {"probe": scorer.probe, "refit": scorer.refit}.get(score_name)
    if reference is not None:  # a score that is a clean reference's log-likelihood: its held-out predictions say more
        estimate = estimate_flag_precision(reference.heldout_log_probs, scorer.verified_labels, noise.transition,
                                           threshold, score_name, config.repair_seed, noise.rate, noise.interval)
        summary.update(estimate.summary() if estimate else {})
    if corrupted is not None:
        hits = int((flagged & corrupted).sum())
        summary["precision"] = hits / int(flagged.sum()) if flagged.any() else 0.0
        summary["recall"] = hits / int(corrupted.sum()) if corrupted.any() else 0.0
        summary["auroc"] = auroc(score, corrupted)
        summary["auroc_by_score"] = {name: auroc(value, corrupted) for name, value in available.items()}
        summary["suggested_label_accuracy_on_corrupted"] = (
            float((suggested[corrupted] == column_array(dataset, "clean_labels")[corrupted]).mean())
            if "clean_labels" in dataset.column_names and corrupted.any() else math.nan
        )
    flagged_indices = np.flatnonzero(flagged).astype(np.int64)
    estimated = summary.get("estimated_flag_precision")
    logger.info("Flagged %d of %d training samples (%s)%s.", len(flagged_indices), n, config.flag_rule,
                f"; an estimated {estimated:.0%} of them are wrong labels" if estimated is not None else "")
    return IdentificationResult(table=datasets.Dataset.from_dict(table), summary=summary, flagged_indices=flagged_indices)
