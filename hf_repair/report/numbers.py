"""The numbers of a repair report: what the result records, and test accuracy before and after the repair.

Test predictions before the repair are computed by swapping the original weights (held by the
result's snapshot) in for one pass and writing the repaired ones back, so the model ends exactly as
it started. The result is duck-typed (`config`, `metrics`, `spaces`, `layers`, `selection`,
`adopted`, `snapshot`): the report sits below `hf_repair.results` and never imports it.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..data import CollateFn, column_array, model_columns, pop_labels
from ..evaluation import ForwardFn, eval_mode, input_names_for
from ..utils.version import __version__

if TYPE_CHECKING:
    from ..results import RepairResult

Missing = list[dict[str, str]]  # {"item": what the report cannot show, "reason": why}


def repair_numbers(result: RepairResult) -> dict[str, Any]:
    """Everything the result itself records: metrics, the selection curve, spaces and layers."""
    metrics = dict(result.metrics)
    metric = result.config.metric_for_selection
    baseline = metrics.get("accuracy_before") if metric == "accuracy" else metrics.get(f"{metric}_before")
    return {
        "hf_repair_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": result.config.method,
        "adopted": result.adopted,
        "metrics": metrics,
        "config": result.config.to_dict(),
        "selection": {
            "metric": metric,
            "greater_is_better": result.config.repair_greater_is_better,
            "baseline": baseline,
            "chosen_alpha": metrics.get("alpha"),
            "points": [{"alpha": alpha, **scores} for alpha, scores in result.selection],
        },
        "spaces": {group: _space_numbers(space) for group, space in result.spaces.items()},
        "layers": [
            {"name": r.name, "kind": r.kind, "group": r.group, "input_dim": r.input_dim, "rank": r.rank,
             "relative_change": r.relative_change}
            for r in result.layers.values()
        ],
    }


def _space_numbers(space: Any) -> dict[str, Any]:
    """How a clean space spreads the verified inputs' energy over its directions."""
    energies = space.energies.detach().double().cpu().numpy()
    energies = np.pad(energies, (0, space.dim - len(energies)))  # a thin space's other directions hold none
    total = energies.sum()
    share = energies / total if total > 0 else np.zeros_like(energies)
    cumulative = np.cumsum(share)
    return {
        "dim": space.dim,
        "rank": space.rank(),
        "num_rows": space.num_rows,
        "directions_for_90": int(np.searchsorted(cumulative, 0.9) + 1) if total > 0 else 0,
        "directions_for_99": int(np.searchsorted(cumulative, 0.99) + 1) if total > 0 else 0,
        "energy_share": [float(f"{s:.6g}") for s in share],
    }


def check_same_model(result: RepairResult, model: nn.Module) -> None:
    """Refuse a model that is not the one the result repaired (its snapshot names layers the model lacks)."""
    snapshot = result.snapshot
    if snapshot is None:
        return
    foreign = snapshot.missing_from(model)
    if foreign:
        raise ValueError(
            f"model is not the model this result repaired: it lacks {foreign[:3]}. Pass the model that was given "
            f"to Repairer."
        )


def numbers_on_test_data(result: RepairResult, model: nn.Module, dataset: datasets.Dataset, label_column: str,
                 forward_fn: ForwardFn, collate_fn: CollateFn | None, batch_size: int,
                 missing: Missing) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrices on test data, before and after the repair."""
    if label_column not in dataset.column_names:
        raise ValueError(f"test_dataset has no {label_column!r} column (columns: {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError("test_dataset is empty; pass labelled held-out samples or leave it out.")
    snapshot = result.snapshot
    if result.adopted and snapshot is not None and snapshot.is_unchanged():
        raise ValueError(
            "The model holds its original weights although the repair was adopted (was result.undo() called?), "
            "so 'after' cannot be measured. Re-apply the repair before writing the report."
        )
    labels = column_array(dataset, label_column).astype(np.int64)
    after = _predict_logits(model, dataset, label_column, forward_fn, collate_fn, batch_size)
    if not result.adopted:
        before = after  # the weights were left bit-identical
    elif snapshot is not None:
        with snapshot.originals_swapped_in():
            before = _predict_logits(model, dataset, label_column, forward_fn, collate_fn, batch_size)
    else:
        before = None
        missing.append({"item": "test accuracy before the repair",
                        "reason": "this result holds no snapshot of the original weights (it was loaded from disk)"})
    num_classes = after.shape[-1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"test_dataset labels span {labels.min()}..{labels.max()}, outside the model's {num_classes} classes.")
    predicted_after = after.argmax(-1)
    predicted_before = before.argmax(-1) if before is not None else None
    per_class = []
    for c in range(num_classes):
        members = labels == c
        support = int(members.sum())
        per_class.append({
            "class": c,
            "support": support,
            "accuracy_before": float((predicted_before[members] == c).mean()) if support and before is not None else None,
            "accuracy_after": float((predicted_after[members] == c).mean()) if support else None,
        })
    return {
        "num_samples": len(labels),
        "accuracy_before": float((predicted_before == labels).mean()) if before is not None else None,
        "accuracy_after": float((predicted_after == labels).mean()),
        "per_class": per_class,
        "confusion_before": _confusion(labels, predicted_before, num_classes) if before is not None else None,
        "confusion_after": _confusion(labels, predicted_after, num_classes),
    }


def _confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[list[int]]:
    counts = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


@torch.no_grad()
def _predict_logits(model: nn.Module, dataset: datasets.Dataset, label_column: str, forward_fn: ForwardFn,
                    collate_fn: CollateFn | None, batch_size: int) -> np.ndarray:
    """Logits of every row, in order, computed in this process alone.

    Not `hf_repair.evaluation.predict`: that gathers over processes, and a report is written by one
    (the main process under `accelerate launch`), so a collective would wait forever.
    """
    input_names = input_names_for(model, forward_fn)
    columns = model_columns(dataset, label_column, input_names)
    if columns == [label_column]:
        raise ValueError(
            f"No column of test_dataset is a model input (columns: {dataset.column_names}); tokenize or "
            f"preprocess it like the verified split."
        )
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_fn or default_data_collator)
    device = next(model.parameters()).device
    logits = []
    with eval_mode(model):
        try:
            for batch in loader:
                batch = dict(batch)
                pop_labels(batch, label_column, required=False)
                inputs = {k: v for k, v in batch.items() if input_names is None or k in input_names}
                logits.append(forward_fn(model, send_to_device(inputs, device)).detach().float().cpu())
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"Could not batch test_dataset ({err}). Inputs of different lengths need a padding collator, "
                f"e.g. collate_fn=DataCollatorWithPadding(tokenizer)."
            ) from err
    return torch.cat(logits).numpy()
