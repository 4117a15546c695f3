"""Reading data: the verified split's folds and batches, the training set's slices, and the column rules they share."""

from .columns import (
    BOOKKEEPING_COLUMNS,
    Batch,
    CollateFn,
    column_array,
    has_transform,
    model_columns,
    model_input_names,
    numpy_batches,
    pop_labels,
    training_batches,
)
from .verified import LabeledBatch, VerifiedSplit, check_label_range, stratified_folds

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "Batch",
    "CollateFn",
    "LabeledBatch",
    "VerifiedSplit",
    "check_label_range",
    "column_array",
    "has_transform",
    "model_columns",
    "model_input_names",
    "numpy_batches",
    "pop_labels",
    "stratified_folds",
    "training_batches",
]
