"""Uniform weight averages: of trajectory points, of fine-tunes from one start, and of fold runs as they finish.

Averaging fine-tunes from one start lands above a single one (a soup; measured, BENCHMARKS.md), so `fresh` and
the fine-tuning refinements end with such averages. The tensors every state shares (frozen weights held once)
are taken as they are, and the states' other non-floating tensors (step counters, integer buffers) from one of them.
"""

from __future__ import annotations

import torch

from .checkpoints import StateDict


def average_weights(states: list[StateDict], latest: int) -> StateDict:
    """The uniform average of state dicts' floating tensors (accumulated in float64); other tensors (step counters,
    integer buffers) from `states[latest]`, and tensors all the states share as they are."""
    averaged = {}
    for key, value in states[latest].items():
        if all(state[key] is value for state in states):
            averaged[key] = value  # one tensor shared by every state (frozen weights held once): nothing to average
        elif value.is_floating_point():
            averaged[key] = (sum(state[key].double() for state in states) / len(states)).to(value.dtype)
        else:
            averaged[key] = value
    return averaged


class FoldRunSum:
    """The running float64 sum of a procedure's fold runs (CPU states without the keys `Trajectory.shared` holds
    with equal values); `average` equals `average_weights` of the runs, one copy of the weights instead of k."""

    def __init__(self) -> None:
        self.count = 0
        self.totals: StateDict = {}
        self.counts: dict[str, int] = {}  # runs each key was in (a run omits a key it holds as `shared` has it)
        self.dtypes: dict[str, torch.dtype] = {}

    def add(self, state: StateDict) -> None:
        self.count += 1
        for key, value in state.items():
            self.counts[key] = self.counts.get(key, 0) + 1
            if not value.is_floating_point():
                self.totals[key] = value  # step counters, integer buffers: the latest run's
                continue
            self.dtypes[key] = value.dtype
            if key in self.totals:
                self.totals[key].add_(value)  # float32 -> float64 is exact: the sum average_weights takes
            else:
                self.totals[key] = value.double()

    def average(self, shared: StateDict) -> StateDict:
        averaged = dict(shared)
        for key, total in self.totals.items():
            if key not in self.dtypes:
                averaged[key] = total
                continue
            missing = self.count - self.counts[key]
            if missing:
                total = total + missing * shared[key].double()
            averaged[key] = (total / self.count).to(self.dtypes[key])
        return averaged
