"""`repair_with_finetuning`: what `Repairer.repair` runs for the fine-tuning methods, and the metrics it reports.

It checks every input before any weight changes, identifies the harmful training samples (unless
given an identification), projects first for the `projection+` methods, runs `RetentionRepair`,
and restores the whole model on any error.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit, stratified_folds
from ..evaluation import (
    ForwardFn,
    default_forward,
    eval_mode,
    input_names_for,
    predict,
    significance_gate,
    split_verified,
)
from ..identification import IdentificationResult, identify_harmful
from ..identification.flag_precision import FLAG_PRECISION_KEYS
from ..modeling.weights import ModelSnapshot
from ..projection.pipeline import ProjectionResult, check_materialized, project
from ..results import RepairResult
from ..utils.distributed import process_info
from .checks import check_finetune_inputs, check_rows_batch_together, input_columns
from .finetune_data import Mixup
from .finetuner import scores_with_loss
from .retention import HELDOUT_FOLD, RetentionRepair, RetentionResult, erases, projects_first


def repair_with_finetuning(
    model: nn.Module,
    config: RepairConfig,
    verified: Any,
    train_dataset: Any,
    identification: IdentificationResult | None = None,
    *,
    forward_fn: ForwardFn = default_forward,
    collate_fn: CollateFn | None = None,
    compute_metrics: Any | None = None,
    noise_transition: torch.Tensor | None = None,
    training_weights: np.ndarray | None = None,
) -> RepairResult:
    """`Repairer.repair` for the fine-tuning methods: identify, (project,) separate and retain, in place.

    `noise_transition`: learn the unflagged training samples through it; `training_weights`: weigh each training
    sample's loss by its entry (`RetentionRepair.run`).
    """
    start = time.perf_counter()
    check_materialized(model)
    check_finetune_inputs(model, config, verified, train_dataset)
    columns = input_columns(train_dataset, verified, config.label_column, input_names_for(model, forward_fn))
    pair = check_rows_batch_together(verified, train_dataset, columns, config.label_column, collate_fn)
    if config.mixup_alpha > 0:  # inputs mixup cannot mix are refused here, before identification or a projection
        Mixup(model, config.mixup_alpha, pair)
    split = split_verified(model, verified, config, forward_fn, collate_fn)
    if identification is None:
        identification = identify_harmful(model, train_dataset, verified, config, forward_fn=forward_fn,
                                          collate_fn=collate_fn)
    elif len(identification.table) != len(train_dataset):
        raise ValueError(
            f"The identification scored {len(identification.table)} samples but train_dataset has {len(train_dataset)}; "
            f"pass the identification of this training set."
        )

    snapshot = ModelSnapshot(model)
    projection: ProjectionResult | None = None
    before, correct_before = heldout_scores(model, split, forward_fn, compute_metrics)
    try:
        if projects_first(config.method):
            projection = project(model, dataclasses.replace(config, method="projection"), verified,
                                 forward_fn=forward_fn, collate_fn=collate_fn, compute_metrics=compute_metrics)
        outcome = RetentionRepair(model, config, forward_fn=forward_fn, collate_fn=collate_fn,
                                  compute_metrics=compute_metrics).run(
            verified, split, train_dataset, identification, projected=projection is not None and projection.adopted,
            noise_transition=noise_transition, training_weights=training_weights)
    except BaseException:
        snapshot.restore()
        raise

    after, correct_after = heldout_scores(model, split, forward_fn, compute_metrics)
    # Adopted means changed: a stage that is not kept (its gain not significant), or stops on a NaN loss,
    # restores the weights it started from.
    adopted = not snapshot.is_unchanged()
    metrics = _metrics(outcome, projection, identification, split, config, before, after, adopted,
                       time.perf_counter() - start)
    # The whole repair against the starting model, on the held-out fold its fine-tune stopped on.
    metrics.update(significance_gate(correct_after, correct_before, config).as_metrics())
    return RepairResult.from_repair(config, metrics, snapshot, projection)


def heldout_scores(model: nn.Module, split: VerifiedSplit, forward_fn: ForwardFn,
                   compute_metrics: Any | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """The model's scores (and cross-entropy) on the held-out verified fold that judges the fine-tune, and
    which of its samples the model gets right (for the paired significance test)."""
    with eval_mode(model):
        logits, labels = predict(model, split.batches(HELDOUT_FOLD), forward_fn)
    return scores_with_loss(logits, labels, compute_metrics), (logits.argmax(-1) == labels).cpu()


def _metrics(outcome: RetentionResult, projection: ProjectionResult | None, identification: IdentificationResult,
             split: VerifiedSplit, config: RepairConfig, before: dict[str, float], after: dict[str, float],
             adopted: bool, elapsed: float) -> dict[str, Any]:
    """`RepairResult.metrics` of a fine-tuning repair; before/after are the held-out verified fold's scores."""
    _, world = process_info()
    steps = sum(result.steps for _, result in outcome.stages)
    batch_size = config.retention_batch_size or config.batch_size
    metrics: dict[str, Any] = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "heldout_loss_before": before["loss"],
        "heldout_loss_after": after["loss"],
        "adopted": adopted,
        "num_verified": split.total_samples,
        "num_heldout": len(stratified_folds(np.asarray(split.labels_all), split.num_folds, config.repair_seed)[HELDOUT_FOLD]),
        "num_train": outcome.num_train,
        "num_flagged": outcome.num_flagged,
        "num_trusted": outcome.num_trusted,
        "separation": None if erases(config.method) else config.separation,
        "steps": steps,
        "max_steps": outcome.total_steps,  # the budget, retention_epochs of the training set
        "batch_size": batch_size,
        "epochs": steps * batch_size * world / max(outcome.num_train, 1),
        "stages": {name: {"adopted": r.adopted, "steps": r.steps, "best_step": r.best_step, "stop_reason": r.stop_reason,
                          "accuracy_before": r.scores_before["accuracy"], "accuracy_after": r.scores_after["accuracy"],
                          "history": r.history}  # per step: train_loss, trusted_fraction, and heldout_* when scored
                   for name, r in outcome.stages},
        "stop_reason": outcome.skipped or (outcome.stages[-1][1].stop_reason if outcome.stages else None),
        "num_layers": len(projection.layers) if projection is not None else 0,
        "repair_time_s": elapsed,
        "identification_time_s": identification.summary.get("identify_time_s"),
    }
    if projection is not None:
        metrics["alpha"] = projection.metrics.get("alpha")
        metrics["projection_adopted"] = projection.adopted
    for key in ("precision", "recall", "auroc", *FLAG_PRECISION_KEYS, "noise_rate_warning"):
        if key in identification.summary:
            metrics[f"identification_{key}"] = identification.summary[key]
    return metrics


