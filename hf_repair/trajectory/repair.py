"""Method "auto" as a repair: the trajectory, from `RepairCallback` or from checkpoints, chosen among and applied."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit
from ..evaluation import ForwardFn, default_forward, split_verified
from ..identification.flag_precision import FLAG_PRECISION_KEYS
from ..modeling.sharding import weight_access_for
from ..modeling.weights import ModelSnapshot
from ..projection.pipeline import ProjectionResult, check_materialized
from ..results import RepairResult
from .candidates import CandidateBuilder, Points
from .checkpoints import (
    Checkpoints,
    StateDict,
    check_state_keys,
    checkpoint_position,
    list_checkpoints,
    load_weights,
    read_checkpoint,
)
from .points import Trajectory
from .recorder import TrajectoryRecorder
from .selection import TrajectoryChoice, choose

logger = logging.getLogger(__name__)

# What `metrics["fresh_identification"]` keeps of the identification a refit of fresh's refinement flagged by
# (precision and recall only where the training set has `is_corrupted`).
FRESH_IDENTIFICATION_KEYS = ("num_samples", "num_flagged", *FLAG_PRECISION_KEYS, "noise_rate_warning", "precision",
                             "recall")


def repair_from_trajectory(
    model: nn.Module,
    config: RepairConfig,
    verified: Any,
    checkpoints: Checkpoints | Trajectory | None = None,
    *,
    train_dataset: Any = None,
    initial_weights: str | os.PathLike | StateDict | None = None,
    forward_fn: ForwardFn = default_forward,
    collate_fn: CollateFn | None = None,
) -> RepairResult:
    """`Repairer.repair` for method "auto"; the model's weights (the final ones) are restored on any error.

    Args:
        checkpoints: the trajectory: a `Trainer` output_dir with `checkpoint-*` folders, a list of checkpoint
            folders or state dicts in training order, or the `Trajectory` `RepairCallback` recorded. None: the
            final weights alone (the candidates are then the refinements on top of them).
        train_dataset: the training data, for the "erase", "retrain", "forward" and "reweight" refinements (left out
            without it).
        initial_weights: the weights training started from (a checkpoint folder, read once into CPU memory, or a
            state dict), for the "fresh" procedure and the "retrain", "forward" and "reweight" refinements;
            `RepairCallback` keeps them in its trajectory.
    """
    start = time.perf_counter()
    check_materialized(model)
    sharding = weight_access_for(model).kind
    if sharding != "plain":
        raise ValueError(f"method='auto' loads whole state dicts, which a {sharding}-sharded model does not support "
                         f"yet; repair the unsharded model (one process or DDP).")
    if initial_weights is not None:  # read and checked before any work: a wrong state would fail only at the retrain
        if not isinstance(initial_weights, dict):
            initial_weights = read_checkpoint(initial_weights, model)
        check_state_keys(model, initial_weights, "initial_weights")
    split = split_verified(model, verified, config, forward_fn, collate_fn)
    snapshot = ModelSnapshot(model)  # the final weights: every candidate is loaded over them, undo restores them
    try:
        trajectory = _trajectory(model, split, config, checkpoints, forward_fn, snapshot)
        if initial_weights is not None:
            trajectory.initial = initial_weights
        builder = CandidateBuilder(model, trajectory, split, verified, config, forward_fn, collate_fn, train_dataset)
        choice = choose(builder, config)
        snapshot.restore()
        points, projection = builder.apply(choice.chosen) if choice.adopted else ((trajectory.final_index,), None)
    except BaseException:
        snapshot.restore()
        raise
    metrics = _metrics(choice, trajectory, points, projection, model, time.perf_counter() - start)
    if builder.fresh.resolved_objective is not None:
        metrics["fresh_objective"] = builder.fresh.resolved_objective  # what "auto" resolved to, where fresh was built
    if builder.average_checks:
        metrics["fold_run_averages"] = builder.average_checks  # kept, or replaced by one more fine-tune
    if builder.fresh_calibration is not None:  # a refinement of fresh was refitted
        estimate = builder.fresh_calibration.noise
        metrics["fresh_noise_rate"] = {"rate": estimate.rate, "interval": list(estimate.interval),
                                       "transition": estimate.transition, "warning": "; ".join(estimate.problems()) or None}
    if builder.fresh_identification is not None:  # what it flagged, and the share of its flags likely wrong labels
        summary = builder.fresh_identification.summary
        metrics["fresh_identification"] = {key: summary[key] for key in FRESH_IDENTIFICATION_KEYS if key in summary}
    return RepairResult.from_repair(config, metrics, snapshot, projection)


def _trajectory(model: nn.Module, split: VerifiedSplit, config: RepairConfig,
                checkpoints: Checkpoints | Trajectory | None, forward_fn: ForwardFn,
                snapshot: ModelSnapshot) -> Trajectory:
    """The trajectory with every point scored and the final weights marked."""
    if isinstance(checkpoints, Trajectory):
        if checkpoints.keep != config.trajectory_keep:
            logger.warning("The trajectory kept the weights of its best %d points; method='auto' draws on those, not "
                           "on trajectory_keep=%d.", checkpoints.keep, config.trajectory_keep)
        recorder = TrajectoryRecorder(model, split, forward_fn, checkpoints.keep, trajectory=checkpoints)
        recorder.predictions()  # the same verified samples, folds and order, or a clear error
    else:
        recorder = TrajectoryRecorder(model, split, forward_fn, config.trajectory_keep)
        states = list_checkpoints(checkpoints) if checkpoints is not None else []
        if not states:
            logger.info("method='auto' got no checkpoints: it weighs head refit and projection on top of the final "
                        "weights only. Pass checkpoints=<Trainer output_dir> or use RepairCallback to add the trajectory.")
        for state in states:
            load_weights(model, state if isinstance(state, dict) else read_checkpoint(state, model))
            step, epoch = checkpoint_position(state) if isinstance(state, str) else (None, None)
            recorder.record(step, epoch, weights=state)
        snapshot.restore()
    if recorder.trajectory is None or not any(point.final for point in recorder.trajectory.points):
        recorder.record_final(None, None)
    return recorder.trajectory


def _metrics(choice: TrajectoryChoice, trajectory: Trajectory, points: Points,
             projection: ProjectionResult | None, model: nn.Module, elapsed: float) -> dict[str, Any]:
    final = trajectory.final_index
    everything = trajectory.training_mask(None)
    before = trajectory.accuracy(final, everything)
    metrics: dict[str, Any] = {
        "accuracy_before": before,
        "accuracy_after": choice.heldout_accuracy[choice.candidate] if choice.adopted else before,
        "adopted": choice.adopted,
        "chosen": choice.chosen,
        "candidate": choice.candidate,
        "heldout_accuracy": choice.heldout_accuracy,
        **choice.comparison.as_metrics(),
        "chosen_points": list(points),  # indices into metrics["trajectory"] of the points the weights average
        "trajectory": trajectory.to_metrics(),
        "alpha": projection.metrics.get("alpha") if projection is not None else None,
        "num_verified": int(trajectory.labels.numel()),
        "num_layers": _changed_modules(model, trajectory, final),
        "repair_time_s": elapsed,
    }
    if choice.skipped:
        metrics["skipped"] = choice.skipped
    if choice.fresh_over_candidate is not None:  # fresh led the folds and its refinement was taken instead
        metrics["fresh_over_candidate"] = choice.fresh_over_candidate.as_metrics()
    return metrics


def _changed_modules(model: nn.Module, trajectory: Trajectory, final: int) -> int:
    """How many modules' weights differ from the final weights."""
    original = trajectory.weights(final)
    changed = {key.rsplit(".", 1)[0] for key, value in model.state_dict().items()
               if key in original and not value.detach().cpu().equal(original[key])}
    return len(changed)
