"""The classification head: the layer whose output is the logits, the rows it reads, and writing a new head in.

Finding the head reuses identification's probing forward pass (one verified batch with hooks on every
supported layer: the head is the layer whose output *is* the returned logits). Its input rows, with a
column of ones for the bias, are the features a refitted softmax regression reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast
from torch import nn

from ..config import RepairConfig
from ..data import VerifiedSplit
from ..evaluation import ForwardFn, eval_mode, predict
from ..identification.influence import TrackedLayer
from ..identification.layers import select_layers
from ..utils.distributed import gather_uneven


@dataclass
class HeadInputs:
    """Every verified sample's head input and logits, fold by fold (the order of `predict_by_fold`)."""

    features: torch.Tensor  # (n, in + 1) float64 on CPU, the bias column last
    logits: torch.Tensor  # (n, C) on CPU
    labels: torch.Tensor  # (n,) on CPU
    folds: torch.Tensor  # (n,) the verified fold of each sample


def find_head(model: nn.Module, split: VerifiedSplit, config: RepairConfig, forward_fn: ForwardFn) -> TrackedLayer:
    """The layer whose output is the logits; `ValueError` if the logits are pooled or transformed after it."""
    probing = dataclasses.replace(config, influence_modules=None, influence_depth=1, probe_module=None)
    with eval_mode(model):
        head = select_layers(model, split, probing, forward_fn).head
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no layer whose output is the logits themselves (they are pooled or "
            f"transformed after the last linear layer), so there is no classification head to refit."
        )
    if head.adapter.weight_module(head.module) is not head.module:
        raise ValueError(
            f"The classification head {head.name!r} is a LoRA layer: a refitted head is a full matrix, not a "
            f"low-rank update of its frozen weight. Train the head whole (peft LoraConfig(modules_to_save="
            f"[{head.name.rsplit('.', 1)[-1]!r}])), or merge the adapter (model.merge_and_unload()) first."
        )
    return head


@torch.no_grad()
def read_head_inputs(model: nn.Module, head: TrackedLayer, split: VerifiedSplit, forward_fn: ForwardFn) -> HeadInputs:
    """One pass over the verified split, fold by fold, keeping the head's input rows and the logits."""
    local_rows: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        local_rows.append(head.input_rows(x.detach(), x.shape[0], torch.float64)[:, 0])

    features, logits, labels, folds = [], [], [], []
    handle = head.module.register_forward_hook(keep, with_kwargs=True)
    try:
        with eval_mode(model):
            for fold in range(split.num_folds):
                local_rows.clear()
                fold_logits, fold_labels = predict(model, split.batches(fold), forward_fn)
                features.append(gather_uneven(torch.cat(local_rows)).cpu())  # every process has samples of every fold
                logits.append(fold_logits.cpu())
                labels.append(fold_labels.cpu())
                folds.append(torch.full_like(labels[-1], fold))
    finally:
        handle.remove()
    return HeadInputs(torch.cat(features), torch.cat(logits), torch.cat(labels), torch.cat(folds))


@torch.no_grad()
def write_head(head: TrackedLayer, weight: torch.Tensor) -> None:
    """Write a (C, in [+ 1]) weight, the bias as the last column, into the head in its own layout and dtype."""
    module = head.module
    in_dim = head.adapter.input_dim(module)
    matrix = head.adapter.from_matrix(weight[:, :in_dim], module.weight)
    module.weight.copy_(matrix.to(device=module.weight.device, dtype=module.weight.dtype))
    if head.has_bias:
        module.bias.copy_(weight[:, in_dim].to(device=module.bias.device, dtype=module.bias.dtype))


def same_on_every_process(tensor: torch.Tensor) -> torch.Tensor:
    """The main process's value of a tensor computed on every process (CPU fits may differ in the last bit)."""
    state = PartialState()
    if state.num_processes == 1:
        return tensor
    return broadcast(tensor.to(state.device).contiguous(), from_process=0).to(tensor.device)
