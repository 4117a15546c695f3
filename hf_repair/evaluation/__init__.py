"""Calling the model, scoring its predictions, and testing whether one set of predictions beats another."""

from .metrics import MetricFn, compute_scores, selection_value
from .prediction import (
    ForwardFn,
    default_forward,
    eval_mode,
    input_names_for,
    predict,
    predict_by_fold,
    split_verified,
)
from .significance import SIGNIFICANCE_TESTS, PairedComparison, compare_predictions, significance_gate

__all__ = [
    "SIGNIFICANCE_TESTS",
    "ForwardFn",
    "MetricFn",
    "PairedComparison",
    "compare_predictions",
    "compute_scores",
    "default_forward",
    "eval_mode",
    "input_names_for",
    "predict",
    "predict_by_fold",
    "selection_value",
    "significance_gate",
    "split_verified",
]
