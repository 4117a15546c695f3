"""Reading datasets the same way in every pass: which columns the model reads, labels out of a
collated batch, and fast Arrow reads of columns and consecutive slices (the training set).

Every pass reads the same columns (`model_columns`: the model's inputs and the label, or every
column when a transform builds the inputs on the fly) and takes the labels out of the collated
batch the same way (`pop_labels`). Training sets are read in Arrow slices (`numpy_batches`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

Batch = dict[str, Any]
CollateFn = Callable[[list[Mapping[str, Any]]], Batch]



# Columns `testbed.noise.corrupt_dataset` adds: bookkeeping for benchmarks, never model inputs.
BOOKKEEPING_COLUMNS = frozenset({"clean_labels", "is_corrupted"})


def has_transform(dataset: Any) -> bool:
    """Whether the dataset builds its rows on the fly (`set_transform` / `with_transform`)."""
    return getattr(dataset, "format", {}).get("type") == "custom"


def model_columns(dataset: Any, label_column: str, input_names: set[str] | None) -> list[str]:
    """The columns a forward pass reads: the model's inputs and the label, in dataset order.

    With an on-the-fly transform (images decoded and resized in `Trainer` scripts run with
    remove_unused_columns=False) the inputs exist only once a row is read, so every column is kept
    for the transform; `pop_labels` and the input-name filter tidy the collated batch instead.
    """
    if has_transform(dataset):
        return list(dataset.column_names)
    return [c for c in dataset.column_names if c == label_column or (
        c not in BOOKKEEPING_COLUMNS and (input_names is None or c in input_names))]


def pop_labels(batch: dict[str, Any], label_column: str, required: bool = True) -> Any:
    """Remove and return the labels of a collated batch (collators rename `label` to `labels`).

    `required=False`: where only the model inputs matter, a batch without labels is fine (None).
    """
    labels = batch.pop(label_column, None)
    if label_column == "label":
        renamed = batch.pop("labels", None)
        labels = renamed if labels is None else labels
    if labels is None and required:
        raise ValueError(f"The collated batch has no {label_column!r} key (keys: {sorted(batch)}).")
    return labels


def column_array(dataset: Any, name: str) -> np.ndarray:
    """One column of a `datasets.Dataset` as a numpy array, read from Arrow in one slice.

    `np.asarray(dataset[name])` formats the column row by row (seconds for 60,000 labels); the
    slice reads it whole and ignores any `set_transform` (labels are raw columns).
    """
    return np.asarray(dataset.select_columns([name]).with_format("numpy")[:][name])


def numpy_batches(dataset: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive slices of a `datasets.Dataset` as numpy arrays, read from Arrow a column at a time.

    Nested-list columns of one shape per row (images, `ArrayND` features) are flattened by Arrow and
    reshaped, many times faster than the numpy formatter's row-by-row recursion; anything else
    (ragged rows, strings, nulls) goes through the formatter.
    """
    for start in range(0, len(dataset), batch_size):
        table = dataset.with_format("arrow")[start : start + batch_size]
        batch = {name: _uniform_list_array(table.column(name)) for name in table.column_names}
        fallback = [name for name, value in batch.items() if value is None]
        if fallback:
            batch.update(dataset.select_columns(fallback).with_format("numpy")[start : start + batch_size])
        yield batch


def _uniform_list_array(column: Any) -> np.ndarray | None:
    """A (possibly nested) Arrow list column whose rows share one shape, as one numeric array; else None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):  # datasets' Array2D..Array5D: nested lists underneath
        array = array.storage
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        return None
    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        if array.null_count:
            return None
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != lengths[0]).any():
            return None
        shape.append(int(lengths[0]) if lengths.size else 0)
        array = array.flatten()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        return None
    if array.null_count:
        return None
    return np.array(array.to_numpy(zero_copy_only=False)).reshape(shape)  # a writable copy, as torch wants


def model_input_names(model: nn.Module) -> set[str] | None:
    """The named inputs of `model.forward`, as `Trainer(remove_unused_columns=True)` keeps them.

    None (keep every column) when the forward takes nothing but **kwargs. A named signature with
    **kwargs too (transformers' models pass attention options that way) counts by its names.
    """
    # FSDP/DDP/DeepSpeed wrappers forward **kwargs; the wrapped model's signature is what counts.
    params = inspect.signature(extract_model_from_parallel(model).forward).parameters
    named = {name for name, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    return named or None


def training_batches(dataset: Any, indices: np.ndarray, label_column: str, input_names: set[str] | None,
                     collate_fn: CollateFn | None, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of `dataset.select(indices)` in order, with the label column and the model's input columns only.

    Without a `collate_fn` or a transform, each batch is read from Arrow in one slice (as numpy, then
    torch: floats as float32 and integers as int64, like a torch-formatted dataset), which is many
    times faster than formatting row by row; otherwise rows go through the collator as in a `DataLoader`.
    """
    keep = model_columns(dataset, label_column, input_names)
    if keep == [label_column]:
        raise ValueError(
            f"No column of the training dataset is a model input: columns {dataset.column_names}, the model's forward "
            f"takes {sorted(input_names or [])}. Tokenize or preprocess it first, or pass a forward_fn."
        )
    subset = dataset.select(indices).select_columns(keep)
    try:
        if collate_fn is not None or has_transform(dataset):
            yield from DataLoader(subset, batch_size=batch_size, shuffle=False,
                                  collate_fn=collate_fn or default_data_collator)
            return
        for batch in numpy_batches(subset, batch_size):
            yield {name: _to_tensor(name, value) for name, value in batch.items()}
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"Could not batch the training dataset ({err}). Inputs of different lengths need a padding collator, "
            f"e.g. collate_fn=DataCollatorWithPadding(tokenizer)."
        ) from err


def _to_tensor(name: str, value: Any) -> Any:
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"column {name!r} has rows of different shapes")
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    return value  # strings and other non-numeric columns: passed through for a custom forward_fn
