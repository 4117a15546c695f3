"""Reading data for a repair: the verified split (folds, shards, batches) and the training set.

Every pass reads the same columns (`model_columns`: the model's inputs and the label, or every
column when a transform builds the inputs on the fly) and takes the labels out of the collated
batch the same way (`pop_labels`). Training sets are read in Arrow slices (`numpy_batches`).

A `datasets.Dataset` is split into stratified folds by index (seeded), and each fold is sharded
as `indices[rank::world]`, so no sample is dropped or counted twice however many processes run.
Collated batches are kept in memory (the split is small and is read once per alpha). A
`DataLoader` of dict batches is also accepted: its batches are read once and dealt to folds
round-robin (under `accelerate launch`, pass the loader already prepared for this process).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..utils.distributed import process_info

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
CollateFn = Callable[[list[Mapping[str, Any]]], Batch]


@dataclass
class LabeledBatch:
    inputs: Batch  # model inputs only, on the model's device
    labels: torch.Tensor
    fold: int


# Columns `hf_repair.noise.corrupt_dataset` adds: bookkeeping for benchmarks, never model inputs.
BOOKKEEPING_COLUMNS = frozenset({"clean_labels", "is_corrupted"})


def has_transform(dataset: Any) -> bool:
    """Whether the dataset builds its rows on the fly (`set_transform` / `with_transform`)."""
    return getattr(dataset, "format", {}).get("type") == "custom"


def model_columns(dataset: Any, label_column: str, input_names: Optional[set[str]]) -> list[str]:
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


def _uniform_list_array(column: Any) -> Optional[np.ndarray]:
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


def model_input_names(model: nn.Module) -> Optional[set[str]]:
    """The named inputs of `model.forward`, as `Trainer(remove_unused_columns=True)` keeps them.

    None (keep every column) when the forward takes nothing but **kwargs. A named signature with
    **kwargs too (transformers' models pass attention options that way) counts by its names.
    """
    # FSDP/DDP/DeepSpeed wrappers forward **kwargs; the wrapped model's signature is what counts.
    params = inspect.signature(extract_model_from_parallel(model).forward).parameters
    named = {name for name, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    return named or None


class VerifiedSplit:
    """Folds of labelled batches for one process, built from a Dataset or a DataLoader."""

    def __init__(
        self,
        data: Any,
        *,
        num_folds: int,
        batch_size: int,
        seed: int,
        label_column: str = "labels",
        collate_fn: Optional[CollateFn] = None,
        input_names: Optional[set[str]] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.num_folds = num_folds
        self.label_column = label_column
        self.device = torch.device(device)
        if isinstance(data, DataLoader):
            self._init_from_loader(data)
        else:
            self._init_from_dataset(data, batch_size, seed, collate_fn or default_data_collator, input_names)

    # ----------------------------------------------------------------------------------------
    # construction

    def _init_from_dataset(self, dataset: Any, batch_size: int, seed: int, collate_fn: CollateFn,
                           input_names: Optional[set[str]]) -> None:
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            raise TypeError(
                f"The verified split must be a datasets.Dataset or a DataLoader of dict batches, got {type(dataset).__name__}."
            )
        if self.label_column not in columns:
            raise ValueError(
                f"The verified split has no {self.label_column!r} column (columns: {columns}). "
                f"Rename the label column, e.g. dataset.rename_column('label', 'labels'), or set label_column."
            )
        labels = column_array(dataset, self.label_column)
        self.total_samples = len(labels)
        _check_labels(labels, self.num_folds)
        self.labels_all = labels

        self._input_names = input_names
        keep = model_columns(dataset, self.label_column, input_names)
        dropped = sorted(set(columns) - set(keep))
        if dropped:
            logger.info("Ignoring verified-split columns the model does not take: %s", dropped)
        if keep == [self.label_column]:
            raise ValueError(
                f"No column of the verified split is a model input: columns {columns}, the model's forward takes "
                f"{sorted(input_names or [])}. Tokenize or preprocess the split first, or pass a forward_fn."
            )
        self._dataset = dataset.select_columns(keep)
        self._batch_size = batch_size
        self._collate_fn = collate_fn
        self._cached: Optional[list[list[Batch]]] = None

        rank, world = process_info()
        folds = stratified_folds(labels, self.num_folds, seed)
        if min(len(f) for f in folds) < world:
            raise ValueError(
                f"The verified split has {len(labels)} samples: too few for {self.num_folds} folds on {world} "
                f"processes (every process needs a sample of every fold). Verify more samples or use fewer folds."
            )
        self.fold_indices = [fold[rank::world] for fold in folds]
        # Every process runs the same number of forward passes per fold: under FSDP or ZeRO-3 each
        # forward is a collective, and a process with one batch more would wait forever.
        self._num_batches = [
            min(math.ceil(math.ceil(len(fold) / world) / batch_size), len(fold) // world) for fold in folds
        ]

    def _init_from_loader(self, loader: DataLoader) -> None:
        self._input_names = None
        batches = _drop_even_batches_padding(loader, [dict(batch) for batch in loader], self.label_column)
        if len(batches) < self.num_folds:
            raise ValueError(
                f"The verified DataLoader gives {len(batches)} batches, fewer than num_folds={self.num_folds}; "
                f"use a smaller batch size or fewer folds."
            )
        for batch in batches:
            if self.label_column not in batch:
                raise ValueError(f"Verified batches have no {self.label_column!r} key (keys: {sorted(batch)}).")
        labels = np.concatenate([np.asarray(_to_cpu(b[self.label_column])).reshape(-1) for b in batches])
        _check_labels(labels, self.num_folds)
        self.total_samples = len(labels)
        self.labels_all = labels
        self._cached = [batches[f :: self.num_folds] for f in range(self.num_folds)]
        self.fold_indices = None

    # ----------------------------------------------------------------------------------------
    # iteration

    def num_local_samples(self, fold: Optional[int] = None) -> int:
        folds = range(self.num_folds) if fold is None else [fold]
        if self.fold_indices is None:  # from a DataLoader
            return sum(len(b[self.label_column]) for f in folds for b in self._cached[f])
        return sum(len(self.fold_indices[f]) for f in folds)

    def batches(self, fold: Optional[int] = None) -> Iterator[LabeledBatch]:
        """Batches of one fold (or of all folds, fold by fold), moved to the device and checked."""
        for f in range(self.num_folds) if fold is None else [fold]:
            for raw in self._raw_batches(f):
                batch = dict(raw)
                labels = pop_labels(batch, self.label_column)
                inputs = {
                    k: _to_device(v, self.device)
                    for k, v in batch.items()
                    if self._input_names is None or k in self._input_names
                }
                _check_finite(inputs)
                yield LabeledBatch(inputs=inputs, labels=torch.as_tensor(labels).reshape(-1).long(), fold=f)

    def _raw_batches(self, fold: int) -> list[Batch]:
        # The verified split is small by nature and is read once per alpha: collate it once.
        if self._cached is None:
            self._cached = [self._collate_fold(f) for f in range(self.num_folds)]
        return self._cached[fold]

    def _collate_fold(self, fold: int) -> list[Batch]:
        chunks = np.array_split(self.fold_indices[fold], self._num_batches[fold])
        loader = DataLoader(self._dataset, batch_sampler=[c.tolist() for c in chunks], collate_fn=self._collate_fn)
        try:
            return list(loader)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(
                f"Could not batch the verified split ({err}). Inputs of different lengths need a padding "
                f"collator, e.g. collate_fn=DataCollatorWithPadding(tokenizer)."
            ) from err


def _drop_even_batches_padding(loader: DataLoader, batches: list[Batch], label_column: str) -> list[Batch]:
    """Cut the samples an Accelerate-prepared loader repeats so that every process gets a full last batch.

    With `even_batches=True` (Accelerate's default) the last global batch is completed with samples from
    the start of the dataset. As `Accelerator.gather_for_metrics` does, keep only the first `remainder`
    samples of that global batch, counted process by process, so no sample is counted twice.
    """
    sampler = getattr(loader, "batch_sampler", None)
    remainder = getattr(loader, "remainder", -1)
    if not (isinstance(sampler, BatchSamplerShard) and sampler.even_batches and remainder > 0 and batches):
        return batches
    last = batches[-1]
    size = len(last[label_column])  # the same on every process: the last batches are even
    keep = min(max(remainder - sampler.process_index * size, 0), size)
    if keep == size:
        return batches
    trimmed = {
        k: v[:keep] if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == size else v for k, v in last.items()
    }
    return batches[:-1] + ([trimmed] if keep else [])


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int) -> list[np.ndarray]:
    """Deal each class's shuffled samples to folds in turn, so every fold sees every class."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    offset = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        for i, index in enumerate(members):
            folds[(offset + i) % num_folds].append(int(index))
        offset += len(members)
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def _check_labels(labels: np.ndarray, num_folds: int) -> None:
    if labels.size == 0:
        raise ValueError("The verified split is empty; it needs labelled samples to build the clean space.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Verified labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.min() < 0:
        raise ValueError(f"Verified labels must be class ids >= 0, found {int(labels.min())}.")
    if labels.size < 2 * num_folds:
        raise ValueError(
            f"The verified split has {labels.size} samples; {num_folds}-fold selection needs at least "
            f"{2 * num_folds}. Verify more samples or lower num_folds."
        )


def check_label_range(labels: np.ndarray, num_classes: int) -> None:
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ValueError(
            f"Verified labels {bad.tolist()[:10]} are outside the model's {num_classes} classes "
            f"(0..{num_classes - 1}). Map them to the model's label ids (model.config.label2id)."
        )


def _check_finite(inputs: Batch) -> None:
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"Verified input {name!r} contains NaN or inf; clean or drop those samples first.")


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


def _to_cpu(value: Any) -> Any:
    return value.cpu() if torch.is_tensor(value) else value


def training_batches(dataset: Any, indices: np.ndarray, label_column: str, input_names: Optional[set[str]],
                     collate_fn: Optional[CollateFn], batch_size: int) -> Iterator[dict[str, Any]]:
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
