"""Calling the model and scoring its predictions."""

from .metrics import MetricFn, compute_scores, selection_value
from .prediction import ForwardFn, default_forward, eval_mode, input_names_for, predict, split_verified

__all__ = [
    "ForwardFn",
    "MetricFn",
    "compute_scores",
    "default_forward",
    "eval_mode",
    "input_names_for",
    "predict",
    "selection_value",
    "split_verified",
]
