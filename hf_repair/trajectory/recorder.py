"""Scoring the model on the verified samples at an evaluation point, and adding the point to the trajectory."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..data import VerifiedSplit
from ..evaluation import ForwardFn, eval_mode, predict_by_fold
from .checkpoints import read_checkpoint, same_weights
from .points import StateDict, Trajectory, TrajectoryPoint


class TrajectoryRecorder:
    """Adds evaluation points of one model on one verified split to a `Trajectory` (forward only, eval mode).

    Under `accelerate launch` every process scores its shard of every fold and the predictions are
    gathered, so every process holds the same trajectory and makes the same choice from it.
    """

    def __init__(self, model: nn.Module, split: VerifiedSplit, forward_fn: ForwardFn, keep: int,
                 trajectory: Trajectory | None = None) -> None:
        self.model = model
        self.split = split
        self.forward_fn = forward_fn
        self.keep = keep
        self.trajectory = trajectory

    @torch.no_grad()
    def predictions(self) -> torch.Tensor:
        """The model's predicted class for every verified sample; sets up the trajectory on first use."""
        with eval_mode(self.model):
            logits, labels, folds = predict_by_fold(self.model, self.split, self.forward_fn)
        if self.trajectory is None:
            self.trajectory = Trajectory(labels, folds, self.keep, reader=partial(read_checkpoint, model=self.model))
        elif not torch.equal(labels.cpu(), self.trajectory.labels):
            raise ValueError("The trajectory was recorded on other verified samples (or folds): score every point on "
                             "the same verified split with the same num_folds, batch_size and seed.")
        return logits.argmax(-1).cpu()

    def record_initial(self) -> None:
        """Keep a CPU copy of the weights as they are now, before training, for "fresh", "retrain", "forward" and
        "reweight" (frozen parameters held once with the points'; the first call scores the model to set up the
        trajectory)."""
        if self.trajectory is None:
            self.predictions()
        frozen = {name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        self.trajectory.initial = self.trajectory.cpu_state(self.model.state_dict(), frozen)

    def record(self, step: int | None, epoch: float | None, weights: StateDict | str | None = None,
               *, final: bool = False, predictions: torch.Tensor | None = None) -> TrajectoryPoint:
        """Score the model as it is now; its weights are `weights` (a checkpoint folder or a state dict) or,
        by default, a CPU copy of its state dict (frozen parameters held once), kept while a selection
        procedure can use it."""
        predictions = self.predictions() if predictions is None else predictions
        if weights is None:
            frozen = {name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
            weights = self.trajectory.cpu_state(self.model.state_dict(), frozen)
        point = TrajectoryPoint(step=step, epoch=epoch, predictions=predictions, weights=weights, final=final)
        self.trajectory.add(point)
        return point

    def record_final(self, step: int | None, epoch: float | None) -> TrajectoryPoint:
        """Mark the model as it is now as the final weights: the point it equals bit for bit, else a new point.

        The last evaluation point usually is the final model; with `load_best_model_at_end` an earlier one is.
        """
        predictions = self.predictions()
        trajectory = self.trajectory
        for point in trajectory.points:
            point.final = False
        for index, point in enumerate(trajectory.points):
            if (point.weights is not None and torch.equal(point.predictions, predictions)
                    and same_weights(self.model, trajectory.weights(index))):
                point.final = True
                return point
        return self.record(step, epoch, final=True, predictions=predictions)
