"""Scoring predictions the way `Trainer` users already do: accuracy, a `compute_metrics(EvalPrediction)`
function, or an `evaluate` metric object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

MetricFn = Callable[[EvalPrediction], dict[str, float]]


def compute_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    compute_metrics: Any | None = None,
) -> dict[str, float]:
    """Accuracy always; plus whatever `compute_metrics` (a function or an `evaluate` metric) reports."""
    predictions = logits.argmax(dim=-1)
    scores = {"accuracy": float((predictions == labels).double().mean())} if labels.numel() else {}
    if compute_metrics is None:
        return scores
    if hasattr(compute_metrics, "compute"):  # an `evaluate.EvaluationModule`
        extra = compute_metrics.compute(predictions=predictions.cpu().numpy(), references=labels.cpu().numpy())
    else:
        extra = compute_metrics(EvalPrediction(predictions=logits.float().cpu().numpy(), label_ids=labels.cpu().numpy()))
    scores.update({k: float(np.asarray(v)) for k, v in (extra or {}).items() if np.ndim(v) == 0})
    return scores


def selection_value(scores: dict[str, float], metric: str) -> float:
    if metric not in scores:
        raise KeyError(
            f"metric_for_selection={metric!r} is not among the computed metrics {sorted(scores)}; "
            f"set RepairConfig.metric_for_selection to one of them."
        )
    return scores[metric]
