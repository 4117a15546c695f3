"""What identification returns: the per-sample table, the summary, and the noise-rate estimates behind the flags."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from ..config import RepairConfig
from ..data import column_array
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
    the score's name, the estimated noise rate, the classes the verified split lacks (`blind_classes`),
    timings, and precision / recall / AUROC when the training set has `is_corrupted`.

    Example:
        >>> ident = Repairer(model, RepairConfig()).identify(train_dataset, verified)
        >>> ident.table.to_pandas().sort_values("score").head()  # the most harmful samples first
        >>> cleaned = train_dataset.select(np.setdiff1d(np.arange(len(train_dataset)), ident.flagged_indices))
    """

    table: datasets.Dataset
    summary: dict[str, Any]
    flagged_indices: np.ndarray

    def __repr__(self) -> str:
        s = self.summary
        text = (
            f"IdentificationResult(score={s['score']!r}, num_samples={s['num_samples']}, num_flagged={s['num_flagged']}, "
            f"flag_rule={s['flag_rule']!r}, estimated_noise_rate={s['estimated_noise_rate']:.4f}"
        )
        if "auroc" in s:
            text += f", precision={s['precision']:.4f}, recall={s['recall']:.4f}, auroc={s['auroc']:.4f}"
        return text + ")"


def build_result(values: np.ndarray, labels: np.ndarray, dataset: datasets.Dataset, scorer: VerifiedPass,
                  config: RepairConfig, score_name: str, components: list[str], timings: dict[str, float]
                  ) -> IdentificationResult:
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
    estimates = _noise_rate_estimates(column, labels, scorer)
    noise_source = "probe_disagreement" if "probe_disagreement" in estimates else "negative_influence"
    noise_rate = estimates[noise_source]
    flagged, threshold = flag_lowest(score, config, noise_rate)

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
        "estimated_noise_rate": noise_rate,
        "noise_rate_source": noise_source,
        "noise_rate_estimates": estimates,
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
    logger.info("Flagged %d of %d training samples (%s).", len(flagged_indices), n, config.flag_rule)
    return IdentificationResult(table=datasets.Dataset.from_dict(table), summary=summary, flagged_indices=flagged_indices)


def _noise_rate_estimates(column: dict[str, np.ndarray], labels: np.ndarray, scorer: VerifiedPass) -> dict[str, float]:
    """Estimates of the share of wrong training labels.

    - negative_influence: the share of samples whose influence on the mean verified loss is negative.
    - probe_disagreement / refit_disagreement: the share whose given label differs from that reference's
      prediction, corrected for its own held-out error e on the verified split (assuming its errors spread
      evenly over the other classes): rate = (d - e) / (1 - e - e / (C - 1)).
    """
    estimates = {"negative_influence": float(np.mean(column["influence_mean"] < 0))}
    for name, reference in (("probe", scorer.probe), ("refit", scorer.refit)):
        if reference is None:
            continue
        disagreement = float(np.mean(column[f"{name}_prediction"] != labels))
        error = 1.0 - reference.heldout_accuracy
        denominator = 1.0 - error - error / max(scorer.num_classes - 1, 1)
        rate = (disagreement - error) / denominator if denominator > 0 else disagreement
        estimates[f"{name}_disagreement"] = float(min(max(rate, 0.0), 1.0))
    return estimates
