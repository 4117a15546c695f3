"""The rows a guarded fine-tune trains on, and how they are batched.

A *fine-tune set* is rows of model inputs read in place from one or more `datasets.Dataset`s, each
with a target (a class id or a soft distribution), a weight and a gate that says how far its label
is trusted. The batches keep the user's collator (text keeps its padding) and carry the targets,
weights and gates beside the model inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import default_data_collator

from ..data import CollateFn, pop_labels
from ..evaluation import ForwardFn, eval_mode

# How far a row's label is trusted (see `FinetuneSet`).
GATE_NONE, GATE_BELIEF, GATE_AGREEMENT, GATE_SURGERY, GATE_SMALL_LOSS, GATE_FORWARD = 0, 1, 2, 3, 4, 5

# Keys under which a row carries its target and (label, weight, gate) to the collator.
_TARGET, _EXTRA = "__hf_repair_target__", "__hf_repair_extra__"


class FinetuneSet(Dataset):
    """Rows of model inputs drawn from one or more `datasets.Dataset`s, each with a target, a weight and a gate.

    Row i is row `rows[i]` of `parts[part_ids[i]]`, so the verified split and the training set are
    read in place (no copy, no cast). Its target is the class id `labels[i]` (cross-entropy) or, when
    `soft_targets` has an entry for i, that probability vector. `gates[i]` says how far the label is
    trusted: `GATE_NONE` fully; `GATE_BELIEF` in proportion to the model's current probability of it,
    p(y|x)^power (not differentiated); `GATE_AGREEMENT` only while the model predicts it;
    `GATE_SURGERY` fully, but the gated rows' gradient loses its component that conflicts with the
    other rows' (gradient surgery, `FinetuneArguments.gradient_surgery`); `GATE_SMALL_LOSS` fully,
    unless its loss is among the largest of its batch's rows with that gate and label
    (`FinetuneArguments.small_loss_trim`); `GATE_FORWARD` as a noisy observation of the true class: its
    cross-entropy is taken on the model's distribution passed through the estimated noise transition
    (`FinetuneArguments.noise_transition`). Rows are fetched in batches (`__getitems__`) and batched
    by the user's collator, so text keeps its padding; when the parts carry `label_column`
    (collators may expect it), the collated batch drops it again.
    """

    def __init__(self, parts: Sequence[Any], part_ids: Any, rows: Any, labels: Any, weights: Any | None = None,
                 gates: Any | None = None, soft_targets: Mapping[int, torch.Tensor] | None = None,
                 label_column: str | None = None) -> None:
        self.parts = list(parts)
        self.label_column = label_column
        self.part_ids = np.asarray(part_ids, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        n = len(self.rows)
        if not (len(self.part_ids) == len(self.labels) == n):
            raise ValueError(f"FinetuneSet got {len(self.part_ids)} part ids, {n} rows and {len(self.labels)} labels.")
        self.weights = torch.ones(n) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        self.gates = torch.zeros(n, dtype=torch.long) if gates is None else torch.as_tensor(np.asarray(gates), dtype=torch.long)
        self.soft_targets = dict(soft_targets or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = np.asarray(indices, dtype=np.int64)
        out: list[dict[str, Any] | None] = [None] * len(indices)
        for part in np.unique(self.part_ids[indices]):
            where = np.flatnonzero(self.part_ids[indices] == part)
            columns = self.parts[part][self.rows[indices[where]].tolist()]  # one batched lookup per part
            for j, position in enumerate(where):
                out[position] = {name: values[j] for name, values in columns.items()}
        for row, index in zip(out, indices.tolist(), strict=True):
            soft = self.soft_targets.get(index)
            row[_TARGET] = self.labels[index] if soft is None else soft
            row[_EXTRA] = (self.labels[index], self.weights[index], self.gates[index])
        return out

    def subset(self, positions: Any, gates: Any | None = None,
               soft_targets: Mapping[int, torch.Tensor] | None = None) -> FinetuneSet:
        """These rows (positions into this set), optionally with new gates and soft targets (keyed by new position)."""
        positions = np.asarray(positions, dtype=np.int64)
        return FinetuneSet(self.parts, self.part_ids[positions], self.rows[positions], self.labels[positions],
                           self.weights[positions], self.gates[positions] if gates is None else gates, soft_targets,
                           self.label_column)


@dataclass
class TargetBatch:
    """A collated batch of model inputs with each row's target distribution, class id, weight and gate."""

    inputs: dict[str, Any]
    targets: torch.Tensor  # (batch, classes) distributions
    labels: torch.Tensor  # (batch,) class ids (the argmax of a soft target)
    weights: torch.Tensor
    gates: torch.Tensor

    def to(self, device: torch.device) -> TargetBatch:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return TargetBatch(inputs, self.targets.to(device), self.labels.to(device), self.weights.to(device),
                           self.gates.to(device))


class Mixup:
    """Mixup (Zhang et al., ICLR 2018) for one fine-tune: each step trains on its batch mixed with itself in a random
    order, every row becoming lambda row + (1 - lambda) partner with lambda ~ Beta(alpha, alpha).

    A network trained on such convex combinations fits the corrupted labels identification missed less than one
    trained on the rows themselves. Floating-point model inputs (pixel values, features) are mixed themselves. Token
    ids cannot be, so for them the output of the model's input embeddings is mixed instead (as in Guo et al., 2019,
    "Augmenting data with mixup for sentence classification"), and an attention mask becomes the union of the pair's so
    that both texts' tokens are seen. Targets and row weights mix alike. Draws from the global generator, which the
    fine-tune seeds. Only fully trusted rows mix (a gate's trust is per row).
    """

    def __init__(self, model: nn.Module, alpha: float, inputs: Mapping[str, Any]) -> None:
        self.alpha = alpha
        self.embeddings = None if mixable(inputs) else input_embeddings(model)
        if self.embeddings is None and not mixable(inputs):
            raise ValueError(f"mixup_alpha needs a floating-point model input to mix (pixel values, features) or, for "
                             f"token ids, a model whose get_input_embeddings() returns the module whose output can be "
                             f"mixed; the model's inputs are {sorted(inputs)} with no floating-point tensor and "
                             f"{type(model).__name__} has no get_input_embeddings(). Set mixup_alpha=0 (and "
                             f"retrain_mixup_alpha=0) for this model.")

    @contextlib.contextmanager
    def mixed(self, batch: TargetBatch) -> Iterator[TargetBatch]:
        """The batch mixed; for token ids the model's input embeddings mix their output while inside this block."""
        if bool((batch.gates != GATE_NONE).any()):
            raise ValueError("mixup mixes fully trusted rows only; this batch has rows gated by small_loss_trim, a "
                             "noise transition or retention (use mixup with 'erase' or auto's retrain, small_loss_trim=0).")
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        order = torch.randperm(len(batch.targets)).to(batch.targets.device)
        mix = lambda t: lam * t + (1 - lam) * t[order]  # noqa: E731
        inputs = dict(batch.inputs)
        if self.embeddings is None:
            inputs = {k: mix(v) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        elif torch.is_tensor(inputs.get("attention_mask")):
            inputs["attention_mask"] = torch.maximum(inputs["attention_mask"], inputs["attention_mask"][order])
        mixed = TargetBatch(inputs, mix(batch.targets), batch.labels, mix(batch.weights), batch.gates)
        if self.embeddings is None:
            yield mixed
            return

        def mix_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if output.shape[0] != len(order):
                raise ValueError(f"mixup mixes the output of {type(module).__name__} row by row, but it returned "
                                 f"{output.shape[0]} rows for a batch of {len(order)}.")
            return mix(output)

        handle = self.embeddings.register_forward_hook(mix_output)
        try:
            yield mixed
        finally:
            handle.remove()


def mixable(inputs: Mapping[str, Any]) -> bool:
    """Whether a batch's model inputs hold a floating-point tensor that mixup mixes itself (not token ids alone)."""
    return any(torch.is_tensor(v) and v.is_floating_point() for v in inputs.values())


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The module that embeds the model's token ids (`get_input_embeddings()` of transformers and peft models), or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        module = get() if callable(get) else None
    except NotImplementedError:  # transformers' default for models without one
        return None
    return module if isinstance(module, nn.Module) else None


class TargetCollator:
    """Runs the user's collator on the model inputs and stacks targets, weights and gates beside them."""

    def __init__(self, collate_fn: CollateFn | None, num_classes: int, label_column: str | None = None) -> None:
        self.collate_fn = collate_fn or default_data_collator
        self.num_classes = num_classes
        self.label_column = label_column

    def __call__(self, rows: list[dict[str, Any]]) -> TargetBatch:
        targets = [row.pop(_TARGET) for row in rows]
        labels, weights, gates = (torch.stack(column) for column in zip(*(row.pop(_EXTRA) for row in rows), strict=True))
        distributions = torch.stack([
            F.one_hot(t, self.num_classes).float() if t.dim() == 0 else t.float() for t in targets
        ])
        inputs = dict(self.collate_fn(rows))
        if self.label_column is not None:  # the targets above stand for it; the forward gets model inputs only
            pop_labels(inputs, self.label_column, required=False)
        return TargetBatch(inputs, distributions, labels, weights, gates)


@torch.no_grad()
def predict_distributions(model: nn.Module, data: FinetuneSet, forward_fn: ForwardFn, collate_fn: CollateFn | None,
                          batch_size: int, num_classes: int) -> torch.Tensor:
    """Predicted class distributions (on CPU) for every row of `data`, in order.

    Every process predicts every row, so all hold identical results without a gather.
    """
    device = next(model.parameters()).device
    collator = TargetCollator(collate_fn, num_classes, data.label_column)
    with eval_mode(model):
        return torch.cat([forward_fn(model, batch.to(device).inputs).float().softmax(-1).cpu()
                          for batch in DataLoader(data, batch_size=batch_size, collate_fn=collator)])
