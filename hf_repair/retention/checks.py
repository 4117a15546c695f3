"""What the fine-tuning repairs check before any weight changes: the datasets, the training rows, the model."""

from __future__ import annotations

from typing import Any

import datasets
from torch import nn
from transformers import default_data_collator

from ..config import RepairConfig
from ..data import model_columns, pop_labels
from ..modeling.sharding import weight_access_for


def check_finetune_inputs(model: nn.Module, config: RepairConfig, verified: Any, train_dataset: Any) -> None:
    """Datasets of the right kinds and an unsharded model, or a clear error that says what to pass instead."""
    if train_dataset is None:
        raise ValueError(
            f"method={config.method!r} fine-tunes on the training data: call repair(verified, train_dataset=...) with "
            f"the datasets.Dataset the model was trained on (model inputs and {config.label_column!r})."
        )
    if not isinstance(verified, datasets.Dataset):
        raise TypeError(
            f"method={config.method!r} trains on part of the verified split, so it must be a datasets.Dataset, "
            f"got {type(verified).__name__}."
        )
    if not isinstance(train_dataset, datasets.Dataset):
        raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(train_dataset).__name__}.")
    sharding = weight_access_for(model).kind
    if sharding != "plain":
        raise ValueError(
            f"method={config.method!r} fine-tunes a whole-model snapshot, which a {sharding}-sharded model does not "
            f"support yet; use method='projection' (it writes sharded weights back layer by layer), or repair the "
            f"unsharded model (one process or DDP)."
        )


def input_columns(train_dataset: datasets.Dataset, verified: datasets.Dataset, label_column: str,
                  input_names: set[str] | None) -> list[str]:
    """The model-input columns both datasets must share, with the same features; a clear error otherwise."""
    if len(train_dataset) == 0:
        raise ValueError("The training dataset is empty (0 rows); pass the dataset the model was trained on.")
    if label_column not in train_dataset.column_names:
        raise ValueError(
            f"The training dataset has no {label_column!r} column (columns: {train_dataset.column_names}); rename its "
            f"label column or set RepairConfig.label_column."
        )
    wanted = [c for c in model_columns(verified, label_column, input_names) if c != label_column]
    missing = [c for c in wanted if c not in train_dataset.column_names]
    if missing:
        raise ValueError(
            f"The training dataset lacks the model-input columns {missing} that the verified split has "
            f"(training columns: {train_dataset.column_names}). Preprocess both the same way."
        )
    return wanted


def check_rows_batch_together(verified: datasets.Dataset, train_dataset: datasets.Dataset, columns: list[str],
                              label_column: str, collate_fn: Any | None) -> dict[str, Any]:
    """The fine-tune batches verified and training rows together: check one of each collates, and return that
    batch's model inputs (the label dropped).

    Features may describe the same values differently (`Array3D` vs nested lists), so the test is
    behavioural: a different tokenizer, image size or dtype fails here, before any weight changes.
    """
    rows = [dataset.select_columns(columns + [label_column])[0] for dataset in (verified, train_dataset)]
    try:
        batch = dict((collate_fn or default_data_collator)(rows))
    except Exception as err:  # collators raise anything from ValueError to RuntimeError on mismatched rows
        details = "; ".join(f"{c}: verified {verified.features[c]} vs training {train_dataset.features[c]}"
                            for c in columns if verified.features[c] != train_dataset.features[c])
        raise ValueError(
            f"A verified row and a training row cannot be batched together ({err}). Preprocess both datasets the same "
            f"way (same tokenizer, image size and dtype){': ' + details if details else ''}."
        ) from err
    pop_labels(batch, label_column, required=False)
    return batch
