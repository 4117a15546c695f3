"""Calling the model and scoring its predictions, the way `Trainer` users already do.

The model is called as `model(**inputs)` and logits are read from `.logits` (or the returned
tensor), unless a `forward_fn(model, inputs) -> logits` is given. The score is accuracy, or a
`compute_metrics(EvalPrediction)` function, or an `evaluate` metric object.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction

from ..utils.distributed import gather_uneven

if TYPE_CHECKING:
    from ..data.verified import LabeledBatch

ForwardFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
MetricFn = Callable[[EvalPrediction], dict[str, float]]


def default_forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    output = model(**inputs)
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        logits = output[0]
    if logits is None:
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__} without .logits; "
            f"pass forward_fn=lambda model, batch: ... returning the logits tensor."
        )
    return logits


def compute_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    compute_metrics: Optional[Any] = None,
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


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable["LabeledBatch"],
    forward_fn: ForwardFn = default_forward,
    before_forward: Optional[Callable[["LabeledBatch"], None]] = None,
    progress: Optional[Any] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch, gathered over processes (rank by rank, no duplicates)."""
    all_logits, all_labels = [], []
    for batch in batches:
        if before_forward is not None:
            before_forward(batch)
        logits = forward_fn(model, batch.inputs)
        all_logits.append(logits.detach().float())
        all_labels.append(batch.labels.to(logits.device))
        if progress is not None:
            progress.update(1)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    return gather_uneven(logits), gather_uneven(labels)
