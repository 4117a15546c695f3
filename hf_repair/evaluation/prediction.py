"""Calling the model the way `Trainer` users already do.

The model is called as `model(**inputs)` and logits are read from `.logits` (or the returned
tensor), unless a `forward_fn(model, inputs) -> logits` is given. Every pass that reads the
verified split builds it here (`split_verified`), with one rule for which columns the model takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..data import CollateFn, LabeledBatch, VerifiedSplit, model_input_names
from ..utils.distributed import gather_uneven

if TYPE_CHECKING:
    from ..config import RepairConfig

ForwardFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def default_forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    output = model(**inputs)
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        logits = output[0]
    if logits is None:
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__} without .logits; "
            f"pass forward_fn=lambda model, batch: ... returning the logits tensor."
        )
    return logits


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[LabeledBatch],
    forward_fn: ForwardFn = default_forward,
    before_forward: Callable[[LabeledBatch], None] | None = None,
    progress: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch, gathered over processes (rank by rank, no duplicates)."""
    all_logits, all_labels = [], []
    for batch in batches:
        if before_forward is not None:
            before_forward(batch)
        logits = forward_fn(model, batch.inputs)
        all_logits.append(logits.detach().float())
        all_labels.append(batch.labels.to(logits.device))
        if progress is not None:
            progress.update(1)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    return gather_uneven(logits), gather_uneven(labels)


def predict_by_fold(
    model: nn.Module,
    split: VerifiedSplit,
    forward_fn: ForwardFn = default_forward,
    before_forward: Callable[[LabeledBatch], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and fold ids of every verified sample, fold by fold, each fold gathered over processes.

    The one sample order of every paired comparison of held-out predictions: the same on every process,
    and the order in which fold-by-fold scoring (a model fitted without fold f, scored on fold f) pools them.
    """
    logits, labels, folds = [], [], []
    for fold in range(split.num_folds):
        fold_logits, fold_labels = predict(model, split.batches(fold), forward_fn, before_forward=before_forward)
        logits.append(fold_logits)
        labels.append(fold_labels)
        folds.append(torch.full_like(fold_labels, fold))
    return torch.cat(logits), torch.cat(labels), torch.cat(folds)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block (no dropout, BatchNorm statistics frozen), then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def input_names_for(model: nn.Module, forward_fn: ForwardFn) -> set[str] | None:
    """The batch keys passed to the model: its named forward arguments, or all of them with a custom forward_fn."""
    return model_input_names(model) if forward_fn is default_forward else None


def split_verified(model: nn.Module, verified: Any, config: RepairConfig, forward_fn: ForwardFn = default_forward,
                   collate_fn: CollateFn | None = None) -> VerifiedSplit:
    """The verified samples as this process's folds of batches, on the model's device; checks the columns."""
    split = VerifiedSplit(
        verified,
        num_folds=config.num_folds,
        batch_size=config.batch_size,
        seed=config.repair_seed,
        label_column=config.label_column,
        collate_fn=collate_fn,
        input_names=input_names_for(model, forward_fn),
        device=next(model.parameters()).device,
    )
    check_image_inputs(model, next(iter(split.batches(0))).inputs)  # batches are collated once and cached
    return split


def check_image_inputs(model: nn.Module, inputs: dict[str, Any]) -> None:
    """Refuse `pixel_values` that are not (batch, num_channels, height, width) for a transformers image model.

    Without it a missing channel dimension fails deep inside the model's patch embedding with a
    message about convolution weights, far from the data that caused it.
    """
    pixel_values = inputs.get("pixel_values")
    num_channels = getattr(getattr(extract_model_from_parallel(model), "config", None), "num_channels", None)
    if not torch.is_tensor(pixel_values) or not isinstance(num_channels, int):
        return
    if pixel_values.dim() != 4 or pixel_values.shape[1] != num_channels:
        hint = " (add the channel dimension, e.g. x[:, None] or x.unsqueeze(1))" if pixel_values.dim() == 3 else ""
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}, but {type(model).__name__} expects "
            f"(batch, {num_channels}, height, width): num_channels={num_channels} in its config{hint}."
        )
