"""Head refit as a repair: refit the classification head on the verified split, adopted only if it beats the model.

Method "head_refit": the head (the layer whose output is the logits) is refitted on the verified split
as a regularised softmax regression on the features it reads, its L2-to-the-trained-head strength
chosen by k-fold (`hf_repair.head_refit.refit`). It is judged out-of-fold -- each verified fold is
predicted by a head refitted on the other folds -- against the unrepaired model's predictions of the
same samples, with the significance gate; if adopted, the head refitted on every verified sample is
written in (weight and bias; snapshot first, restored on any error).

Method "projection+head_refit": the projection (`hf_repair.projection`, with its own gate) first, then
the head of the projected model is refitted and gated against the projected model. The projected
model's features were built with the whole verified split, so the refit's held-out judgement is
held-out for the head only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from torch import nn

from ..config import HEAD_REFIT_METHODS, RepairConfig
from ..data import CollateFn
from ..evaluation import ForwardFn, compute_scores, default_forward, selection_value, significance_gate, split_verified
from ..modeling.sharding import weight_access_for
from ..modeling.weights import ModelSnapshot
from ..projection.pipeline import check_materialized, project
from ..results import RepairResult
from .head import find_head, read_head_inputs, write_head
from .refit import fit_head, out_of_fold_logits

logger = logging.getLogger(__name__)


def refit_classification_head(
    model: nn.Module,
    config: RepairConfig,
    verified: Any,
    *,
    forward_fn: ForwardFn = default_forward,
    collate_fn: CollateFn | None = None,
    compute_metrics: Any | None = None,
) -> tuple[dict[str, Any], ModelSnapshot]:
    """Refit `model`'s head in place if the out-of-fold refit significantly beats it; (metrics, head snapshot).

    The snapshot holds the head's weight and bias as they were; the model is restored on any error.
    """
    start = time.perf_counter()
    check_materialized(model)
    sharding = weight_access_for(model).kind
    if sharding != "plain":
        raise ValueError(f"method={config.method!r} reads and writes the whole head, which a {sharding}-sharded model "
                         f"does not support yet; repair the unsharded model (one process or DDP).")
    split = split_verified(model, verified, config, forward_fn, collate_fn)
    head = find_head(model, split, config, forward_fn)
    inputs = read_head_inputs(model, head, split, forward_fn)
    anchor = head.head_weight().cpu()
    heldout = out_of_fold_logits(inputs.features, inputs.labels, inputs.folds, anchor, config.repair_seed)

    before = compute_scores(inputs.logits, inputs.labels, compute_metrics)
    refitted = compute_scores(heldout, inputs.labels, compute_metrics)
    comparison = significance_gate(heldout.argmax(-1) == inputs.labels, inputs.logits.argmax(-1) == inputs.labels,
                                   config)
    sign = 1.0 if config.repair_greater_is_better else -1.0
    metric = config.metric_for_selection
    margin = sign * (selection_value(refitted, metric) - selection_value(before, metric))
    adopted = margin > config.min_improvement and comparison.significant

    snapshot = ModelSnapshot(head.module)
    prox = None
    if adopted:
        try:
            refit = fit_head(inputs.features, inputs.labels, anchor, config.num_folds, config.repair_seed)
            write_head(head, refit.weight)
            prox = refit.prox
        except BaseException:
            snapshot.restore()
            raise
        logger.info("Refitted the head %s on the verified split: %s.", head.name, comparison.describe())
    else:
        logger.info("The refitted head %s did not beat the model on held-out verified samples by more than "
                    "min_improvement and noise (%s); the model is left exactly as it was.", head.name,
                    comparison.describe())
    after = refitted if adopted else before
    metrics: dict[str, Any] = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "heldout_refit_accuracy": refitted["accuracy"],
        "adopted": adopted,
        "head": head.name,
        "head_prox": prox,
        **comparison.as_metrics(),
        "num_verified": int(inputs.labels.numel()),
        "num_layers": 1,
        "repair_time_s": time.perf_counter() - start,
    }
    if metric != "accuracy":
        metrics[f"{metric}_before"], metrics[f"{metric}_after"] = before[metric], after[metric]
    return metrics, snapshot


def repair_head(
    model: nn.Module,
    config: RepairConfig,
    verified: Any,
    *,
    forward_fn: ForwardFn = default_forward,
    collate_fn: CollateFn | None = None,
    compute_metrics: Any | None = None,
) -> RepairResult:
    """`Repairer.repair` for "head_refit" and "projection+head_refit"; `result.undo()` restores every weight exactly."""
    if config.method not in HEAD_REFIT_METHODS:
        raise ValueError(f"repair_head runs {list(HEAD_REFIT_METHODS)}, not {config.method!r}.")
    kwargs = dict(forward_fn=forward_fn, collate_fn=collate_fn, compute_metrics=compute_metrics)
    if config.method == "head_refit":
        metrics, snapshot = refit_classification_head(model, config, verified, **kwargs)
        return RepairResult.from_repair(config, metrics, snapshot)

    start = time.perf_counter()
    check_materialized(model)
    snapshot = ModelSnapshot(model)  # the projection and the refit both change the head: undo both at once
    try:
        projection = project(model, dataclasses.replace(config, method="projection"), verified, **kwargs)
        metrics, _ = refit_classification_head(model, config, verified, **kwargs)
    except BaseException:
        snapshot.restore()
        raise
    metrics = {
        **metrics,
        "accuracy_before": projection.metrics["accuracy_before"],
        "accuracy_after": metrics["accuracy_after"] if metrics["adopted"] else projection.metrics["accuracy_after"],
        "head_refit_accuracy_before": metrics["accuracy_before"],
        "head_refit_adopted": metrics["adopted"],
        "projection_adopted": projection.adopted,
        "adopted": projection.adopted or metrics["adopted"],
        "alpha": projection.metrics["alpha"],
        "projection": {key: value for key, value in projection.metrics.items() if key != "repair_time_s"},
        "num_layers": projection.metrics["num_layers"],
        "repair_time_s": time.perf_counter() - start,
    }
    return RepairResult.from_repair(config, metrics, snapshot, projection)
