"""The training trajectory as method "auto" sees it: every evaluation point's verified predictions, and weights.

Every point keeps its predicted class for every verified sample (n integers, in the order of
`predict_by_fold`), so any selection rule can be scored on any subset of the verified samples without
another forward pass. Weights are kept only where a selection procedure can still draw on them: a
point's weights are needed only while it is among the `keep` best points by accuracy on some set of
samples a procedure ranks on -- the complement of each verified fold (the nested selection) and all
verified samples (the final run) -- or while it is the latest point (it may turn out to be the final
weights). A point that drops out of every such top-`keep` never comes back (later points only push it
further down), so its in-memory weights are freed at once.

Memory, with weights held in memory (`RepairCallback`): at most (num_folds + 1) x keep + 1 CPU copies
of the model's state dict; since the rankings mostly agree, usually little more than keep + 1. Parameters
that stay frozen and unchanged (a LoRA's base model, a frozen backbone) are held once for all points
(`Trajectory.shared`), so a LoRA fine-tune costs one copy of the model plus keep + 1 adapters. Points
read from checkpoint folders keep only the folder's path. The weights training started from (`initial`,
for "fresh", "retrain", "forward" and "reweight") are one more copy of the trainable weights (of a LoRA: its
adapter and head); at train end "fresh" holds num_folds + 1 more while `auto` chooses, and erase and retrain at
most two float64 sums of them (four copies' worth: the fold runs being judged and the best judged so far).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoints import StateDict, read_checkpoint


@dataclass
class TrajectoryPoint:
    """One evaluation point: when it was, what it predicted on the verified samples, and where its weights are."""

    step: int | None
    epoch: float | None
    predictions: torch.Tensor  # (n,) int64 on CPU: the predicted class of every verified sample
    weights: StateDict | str | os.PathLike | None  # CPU state dict, a checkpoint folder, or None (dropped)
    final: bool = False  # the weights the model ends training with (what `auto` compares every candidate to)


class Trajectory:
    """The evaluation points of one training run, on one verified split, with the keep policy above."""

    def __init__(self, labels: torch.Tensor, folds: torch.Tensor, keep: int,
                 reader: Callable[[str], StateDict] = read_checkpoint) -> None:
        self.labels = labels.cpu()
        self.folds = folds.cpu()
        self.keep = keep
        self.reader = reader  # reads a checkpoint folder's weights
        self.points: list[TrajectoryPoint] = []
        self.shared: StateDict = {}  # frozen weights every in-memory point has, held once (`cpu_state`)
        self.initial: StateDict | None = None  # the weights training started from, if kept
        self._read: dict[int, StateDict] = {}  # checkpoint folders read so far, while usable

    @property
    def num_folds(self) -> int:
        return int(self.folds.max()) + 1

    @property
    def final_index(self) -> int:
        return next(i for i, point in enumerate(self.points) if point.final)

    def training_mask(self, fold: int | None) -> torch.Tensor:
        """The samples a procedure may select on: all but fold `fold` (all of them for None)."""
        return torch.ones_like(self.labels, dtype=torch.bool) if fold is None else self.folds != fold

    def correct(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions == self.labels

    def accuracy(self, index: int, mask: torch.Tensor) -> float:
        return float(self.correct(self.points[index].predictions)[mask].double().mean())

    def ranking(self, mask: torch.Tensor) -> list[int]:
        """Point indices by accuracy on `mask`, best first; the earlier point on ties (as Trainer's best model)."""
        return sorted(range(len(self.points)), key=lambda i: (-self.accuracy(i, mask), i))

    def top(self, fold: int | None) -> list[int]:
        """The `keep` best points on the samples outside `fold` (on all samples for None)."""
        return self.ranking(self.training_mask(fold))[: self.keep]

    def add(self, point: TrajectoryPoint) -> None:
        if point.predictions.shape != self.labels.shape:
            raise ValueError(f"A trajectory point predicts {point.predictions.numel()} verified samples, the trajectory "
                             f"has {self.labels.numel()}: score every point on the same verified split.")
        self.points.append(point)
        self._free_unusable()

    def usable(self) -> set[int]:
        """The points whose weights some selection procedure can still draw on, plus the latest."""
        usable = {len(self.points) - 1}
        for fold in [*range(self.num_folds), None]:
            usable.update(self.top(fold))
        return usable

    def weights(self, index: int) -> StateDict:
        """The weights of point `index` on CPU (a checkpoint folder is read once while it stays usable)."""
        weights = self.points[index].weights
        if weights is None:
            raise RuntimeError(f"The weights of trajectory point {index} were not kept: no selection procedure can use "
                               f"them (it is not among the trajectory_keep={self.keep} best points on any ranking).")
        if isinstance(weights, dict):
            return {**self.shared, **weights} if self.shared else weights
        if index not in self._read:
            usable = self.usable()
            self._read = {i: state for i, state in self._read.items() if i in usable}
            self._read[index] = self.reader(weights)
        return self._read[index]

    def initial_weights(self) -> StateDict:
        """The weights training started from, on CPU, with the frozen ones `shared` holds."""
        if self.initial is None:
            raise RuntimeError("The trajectory has no initial weights: RepairCallback keeps them when 'fresh', "
                               "'retrain', 'forward' or 'reweight' is among auto_candidates; offline, pass initial_weights=.")
        return {**self.shared, **self.initial} if self.shared else self.initial

    def cpu_state(self, state: StateDict, frozen: set[str]) -> StateDict:
        """A CPU copy of `state` for a new point, without the `frozen` keys `shared` already holds with equal values.

        The first point's frozen keys fill `shared`. A frozen key whose value differs from the shared one (a
        layer unfrozen, changed and frozen again) stays in the point's state and overrides the shared value.
        Copied key by key, so no second whole copy of the frozen weights exists even for a moment.
        """
        first = not self.points and not self.shared
        kept: StateDict = {}
        for key, value in state.items():
            value = value.detach().to("cpu", copy=True)
            if first and key in frozen:
                self.shared[key] = value
            elif key not in self.shared or not torch.equal(value, self.shared[key]):
                kept[key] = value
        return kept

    def release_weights(self) -> None:
        """Free every kept state (the predictions stay, for inspection); no procedure can be run afterwards."""
        for point in self.points:
            if isinstance(point.weights, dict):
                point.weights = None
        self.initial = None
        self.shared = {}
        self._read.clear()

    def _free_unusable(self) -> None:
        usable = self.usable()
        for index, point in enumerate(self.points):
            if index not in usable and isinstance(point.weights, dict):
                point.weights = None

    def to_metrics(self) -> list[dict[str, object]]:
        """Each point's step, epoch and verified accuracy, for `RepairResult.metrics["trajectory"]`."""
        everything = self.training_mask(None)
        return [{"step": p.step, "epoch": p.epoch, "accuracy": self.accuracy(i, everything), "final": p.final}
                for i, p in enumerate(self.points)]
