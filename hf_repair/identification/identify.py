"""Find the training samples that hurt a model, ranked, using only the trained model and a verified split.

Every training sample gets a score (lower = more harmful), a suggested label and a flag. Scores:

- `probe` (the default where the model allows it, `score="auto"`): the given label's log-likelihood under
  a softmax regression fitted on the verified split from the features the classifier MLP reads. A network
  memorises its noisy labels mostly in the layers next to the logits; this reference is not fooled by it.
- `refit`: the same under the classification head refitted on the verified split.
- `influence`: first-order influence of the sample on the verified loss, s(z) = g_z^T H^-1 g_clean
  (`hf_repair.identification.influence`), with per-class verified gradients. It is the first-order change of the
  sample's given-label log-likelihood under a damped Newton step on the verified loss; the refit takes
  that step to convergence.
- `projection`: the given label's log-likelihood under the projection-repaired model (a copy).
- `combined`: the mean of the normalised ranks of `combine_scores`.
- `loss`: the trained model's own given-label log-likelihood (the loss-ranking baseline).

Flagging (`flag_rule`): by default the estimated noise rate's share of lowest scores, the rate being the
share of given labels the probe disagrees with, calibrated by its held-out confusion on the verified split
(`noise_rate`, with an interval and a warning when it cannot be trusted); or every score below a threshold;
or a fixed budget. The suggested label is the probe's prediction.

The training set is streamed in batches, sharded `indices[rank::world]` across processes under
`accelerate launch`, and gathered back in dataset order; memory is bounded by the tracked layers (plus
the verified split's features for the probe and the refit), not by the training set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, check_label_range, column_array, model_columns
from ..evaluation import ForwardFn, default_forward, eval_mode, input_names_for, split_verified
from .layers import SelectedLayers, select_layers
from .result import IdentificationResult, build_result
from .training_pass import projected_reference, score_training_set
from .verified_pass import VerifiedPass

logger = logging.getLogger(__name__)

# Rows of the training set read at once when checking its inputs for NaN or inf.
_FINITE_CHECK_ROWS = 8192


def identify_harmful(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    verified: Any,
    config: RepairConfig | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    collate_fn: CollateFn | None = None,
    keep_reference_log_probs: bool = False,
) -> IdentificationResult:
    """Score, rank and flag every training sample with the verified split; the model is left unchanged.

    Args:
        model: the trained classifier (called as `model(**inputs)` unless `forward_fn` is given).
        train_dataset: the `datasets.Dataset` it was trained on, with model inputs and `config.label_column`.
        verified: the verified split (a `datasets.Dataset` or a DataLoader of dict batches), as for `repair`.
        config: `score`, `flag_rule`, `influence_modules`, `damping`, ... (`RepairConfig()` by default).
        forward_fn: `forward_fn(model, inputs) -> logits` for models not called as `model(**inputs)`.
        collate_fn: batches samples of both datasets (e.g. `DataCollatorWithPadding(tokenizer)`).
        keep_reference_log_probs: also return every class's log-probability under the reference that suggests
            labels (`IdentificationResult.reference_log_probs`: one float32 per training sample and class).
    """
    start = time.perf_counter()
    config = config or RepairConfig()
    forward_fn = forward_fn or default_forward
    labels = _check_train_dataset(train_dataset, config.label_column)
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters; identification needs a trained model.")
    _check_finite_inputs(train_dataset, config.label_column, input_names_for(model, forward_fn))
    split = split_verified(model, verified, config, forward_fn, collate_fn)
    timings: dict[str, float] = {}
    with eval_mode(model):
        layers = select_layers(model, split, config, forward_fn)
        _check_train_label_range(labels, layers.num_classes)
        check_label_range(np.asarray(split.labels_all), layers.num_classes)
        score = _resolve_score(config, layers)
        components = list(config.combine_scores) if score == "combined" else [score]
        tic = time.perf_counter()
        scorer = VerifiedPass(model, layers, config, forward_fn).run(split, refit="refit" in components)
        timings["verified_pass_s"] = time.perf_counter() - tic
        projected = None
        if "projection" in components:
            tic = time.perf_counter()
            projected = projected_reference(model, verified, config, forward_fn, collate_fn)
            timings["projection_repair_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        values, reference_log_probs, noise_rates = score_training_set(
            model, projected, train_dataset, scorer, config, forward_fn, collate_fn, input_names_for(model, forward_fn),
            split.device, keep_reference_log_probs)
        timings["train_pass_s"] = time.perf_counter() - tic

    timings["identify_time_s"] = time.perf_counter() - start
    result = build_result(values, noise_rates, labels, train_dataset, scorer, config, score, components, timings)
    return dataclasses.replace(result, reference_log_probs=reference_log_probs)


# ----------------------------------------------------------------------------------------------
# input checks


def _check_train_dataset(dataset: Any, label_column: str) -> np.ndarray:
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty (0 rows); pass the dataset the model was trained on.")
    if label_column not in columns:
        raise ValueError(
            f"The training dataset has no {label_column!r} column (columns: {columns}). Rename its label column, "
            f"e.g. dataset.rename_column('label', {label_column!r}), or set RepairConfig.label_column."
        )
    labels = column_array(dataset, label_column)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Training labels in {label_column!r} must be integer class ids (one per row), got dtype {labels.dtype} "
            f"and shape {labels.shape}."
        )
    return labels.astype(np.int64)


def _check_finite_inputs(dataset: datasets.Dataset, label_column: str, input_names: set[str] | None) -> None:
    """NaN or inf in a floating input column would score its rows NaN and leave them unflagged: refuse them.

    The stored columns are read from Arrow in slices (inputs an on-the-fly transform builds are not seen).
    """
    schema = dataset.features.arrow_schema
    columns = [name for name in model_columns(dataset, label_column, input_names)
               if name != label_column and pa.types.is_floating(_leaf_type(schema.field(name).type))]
    if not columns:
        return
    bad: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(dataset), _FINITE_CHECK_ROWS):
        table = dataset.select_columns(columns).with_format("arrow")[start : start + _FINITE_CHECK_ROWS]
        for name in columns:
            rows = _nonfinite_rows(table.column(name))
            if rows.size:
                bad.setdefault(name, []).append(rows + start)
    if bad:
        found = {name: np.concatenate(parts) for name, parts in bad.items()}
        rows = np.unique(np.concatenate(list(found.values())))
        described = "; ".join(f"{name!r} in rows {_first(index)}" for name, index in found.items())
        raise ValueError(
            f"Training inputs contain NaN or inf ({described}); those rows would be scored NaN and never flagged. "
            f"Fix them, or drop the {len(rows)} rows, e.g. "
            f"train_dataset.select(np.setdiff1d(np.arange(len(train_dataset)), bad_rows)) with bad_rows = {_first(rows)}."
        )


def _leaf_type(arrow_type: pa.DataType) -> pa.DataType:
    """The element type under any nesting of lists and datasets' ArrayND extension types."""
    while True:
        if isinstance(arrow_type, pa.ExtensionType):
            arrow_type = arrow_type.storage_type
        elif _is_list(arrow_type):
            arrow_type = arrow_type.value_type
        else:
            return arrow_type


def _is_list(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _nonfinite_rows(column: pa.ChunkedArray) -> np.ndarray:
    """Sorted indices of the rows of a (nested) floating column holding a NaN or inf."""
    levels = [column.combine_chunks()]  # the array at each nesting level, outermost first
    while True:
        array = levels[-1]
        if isinstance(array, pa.ExtensionArray):
            levels[-1] = array.storage
        elif _is_list(array.type):
            levels.append(pc.list_flatten(array))
        else:
            break
    finite = pc.is_finite(levels[-1]).fill_null(True)
    if pc.all(finite).as_py():
        return np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(~finite.to_numpy(zero_copy_only=False))
    for array in reversed(levels[:-1]):  # map element indices back to their parent lists, level by level
        rows = np.unique(pc.list_parent_indices(array).to_numpy()[rows])
    return rows


def _first(indices: np.ndarray, count: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:count])
    return f"[{shown}{', ...' if len(indices) > count else ''}]"


def _check_train_label_range(labels: np.ndarray, num_classes: int) -> None:
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ValueError(
            f"Training labels {bad.tolist()[:10]} are outside the model's {num_classes} classes (0..{num_classes - 1}). "
            f"Map them to the model's label ids (model.config.label2id) or drop those rows."
        )


def _resolve_score(config: RepairConfig, layers: SelectedLayers) -> str:
    """'auto' is the probe (the best score measured), else the influence; a score the model cannot give is an error."""
    no_head = "no layer's output is the logits themselves"
    if config.score == "auto":
        if layers.probe is not None:
            return "probe"
        logger.info("score='auto': no probe (%s); using the influence score.", layers.probe_problem)
        return "influence"
    components = list(config.combine_scores) if config.score == "combined" else [config.score]
    if "probe" in components and layers.probe is None:
        raise ValueError(
            f"score={config.score!r} needs the 'probe' score, which needs a layer with one input row per sample "
            f"before the logits ({layers.probe_problem}). Set probe_module, or use score='influence'."
        )
    if "refit" in components and layers.head is None:
        raise ValueError(
            f"score={config.score!r} needs the 'refit' score, which needs a classification head whose output is the "
            f"logits ({no_head}). Use score='influence' or 'probe', or set combine_scores."
        )
    return config.score
