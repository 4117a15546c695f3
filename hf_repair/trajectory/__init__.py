"""Method "auto": the training trajectory (best point, weight averages, soups), a fresh fine-tune of the initial weights on
the verified samples, and head refit / projection / erase / retrain on top, chosen by nested held-out verified folds and
adopted only if significantly better than the final weights."""

from .candidates import BASE_PROCEDURES, REFINEMENTS, CandidateBuilder
from .checkpoints import list_checkpoints, read_checkpoint
from .points import Trajectory, TrajectoryPoint
from .recorder import TrajectoryRecorder
from .repair import repair_from_trajectory
from .selection import TrajectoryChoice, choose

__all__ = [
    "BASE_PROCEDURES",
    "REFINEMENTS",
    "CandidateBuilder",
    "Trajectory",
    "TrajectoryChoice",
    "TrajectoryPoint",
    "TrajectoryRecorder",
    "choose",
    "list_checkpoints",
    "read_checkpoint",
    "repair_from_trajectory",
]
