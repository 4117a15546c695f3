"""A short, guarded fine-tune: the retain step of beneficial retention and of the erase baseline.

Both repairs train the model briefly on a *fine-tune set* -- rows of model inputs, each with a
label (or a soft target), a weight and a gate that says how far the label is trusted -- and
differ only in which rows they put there. The loop runs on Accelerate (one process or
`accelerate launch`, mixed precision as the Accelerate state already says, the model left on its
device), can pull the weights towards the trained ones (an L2 or Fisher-weighted penalty), scores
held-out verified samples every few steps and keeps the checkpoint with the lowest held-out
cross-entropy only if its held-out metric is not below the starting model's. Otherwise, and on a
NaN or inf loss, every parameter and buffer is restored bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import default_data_collator

from ..config.retention import RETENTION_PENALTIES
from ..data import CollateFn, VerifiedSplit, pop_labels
from ..evaluation import ForwardFn, compute_scores, predict, selection_value
from ..modeling.weights import ModelSnapshot
from ..utils.distributed import sum_across_processes

logger = logging.getLogger(__name__)

_TARGET, _EXTRA = "__hf_repair_target__", "__hf_repair_extra__"
GATE_NONE, GATE_BELIEF, GATE_AGREEMENT, GATE_SURGERY = 0, 1, 2, 3


class FinetuneSet(Dataset):
    """Rows of model inputs drawn from one or more `datasets.Dataset`s, each with a target, a weight and a gate.

    Row i is row `rows[i]` of `parts[part_ids[i]]`, so the verified split and the training set are
    read in place (no copy, no cast). Its target is the class id `labels[i]` (cross-entropy) or, when
    `soft_targets` has an entry for i, that probability vector. `gates[i]` says how far the label is
    trusted: `GATE_NONE` fully; `GATE_BELIEF` in proportion to the model's current probability of it,
    p(y|x)^power (not differentiated); `GATE_AGREEMENT` only while the model predicts it;
    `GATE_SURGERY` fully, but the gated rows' gradient loses its component that conflicts with the
    other rows' (gradient surgery, `FinetuneArguments.gradient_surgery`). Rows are
    fetched in batches (`__getitems__`) and batched by the user's collator, so text keeps its padding;
    when the parts carry `label_column` (collators may expect it), the collated batch drops it again.
    """

    def __init__(self, parts: Sequence[Any], part_ids: Any, rows: Any, labels: Any, weights: Optional[Any] = None,
                 gates: Optional[Any] = None, soft_targets: Optional[Mapping[int, torch.Tensor]] = None,
                 label_column: Optional[str] = None) -> None:
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
        out: list[Optional[dict[str, Any]]] = [None] * len(indices)
        for part in np.unique(self.part_ids[indices]):
            where = np.flatnonzero(self.part_ids[indices] == part)
            columns = self.parts[part][self.rows[indices[where]].tolist()]  # one batched lookup per part
            for j, position in enumerate(where):
                out[position] = {name: values[j] for name, values in columns.items()}
        for row, index in zip(out, indices.tolist()):
            soft = self.soft_targets.get(index)
            row[_TARGET] = self.labels[index] if soft is None else soft
            row[_EXTRA] = (self.labels[index], self.weights[index], self.gates[index])
        return out

    def subset(self, positions: Any, gates: Optional[Any] = None,
               soft_targets: Optional[Mapping[int, torch.Tensor]] = None) -> "FinetuneSet":
        """These rows (positions into this set), optionally with new gates and soft targets (keyed by new position)."""
        positions = np.asarray(positions, dtype=np.int64)
        return FinetuneSet(self.parts, self.part_ids[positions], self.rows[positions], self.labels[positions],
                           self.weights[positions], self.gates[positions] if gates is None else gates, soft_targets,
                           self.label_column)


@dataclass
class TargetBatch:
    inputs: dict[str, Any]
    targets: torch.Tensor  # (batch, classes) distributions
    labels: torch.Tensor  # (batch,) class ids (the argmax of a soft target)
    weights: torch.Tensor
    gates: torch.Tensor

    def to(self, device: torch.device) -> "TargetBatch":
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return TargetBatch(inputs, self.targets.to(device), self.labels.to(device), self.weights.to(device),
                           self.gates.to(device))


class _TargetCollator:
    """Runs the user's collator on the model inputs and stacks targets, weights and gates beside them."""

    def __init__(self, collate_fn: CollateFn, num_classes: int, label_column: Optional[str] = None) -> None:
        self.collate_fn = collate_fn
        self.num_classes = num_classes
        self.label_column = label_column

    def __call__(self, rows: list[dict[str, Any]]) -> TargetBatch:
        targets = [row.pop(_TARGET) for row in rows]
        labels, weights, gates = (torch.stack(column) for column in zip(*(row.pop(_EXTRA) for row in rows)))
        distributions = torch.stack([
            F.one_hot(t, self.num_classes).float() if t.dim() == 0 else t.float() for t in targets
        ])
        inputs = dict(self.collate_fn(rows))
        if self.label_column is not None:  # the targets above stand for it; the forward gets model inputs only
            pop_labels(inputs, self.label_column, required=False)
        return TargetBatch(inputs, distributions, labels, weights, gates)


@dataclass
class FinetuneArguments:
    """The knobs of one guarded fine-tune (filled from `RepairConfig` by the repairs)."""

    learning_rate: float
    max_steps: int
    batch_size: int
    belief_power: float = 1.0
    penalty: str = "none"
    penalty_strength: float = 0.0
    eval_steps: Optional[int] = None
    patience: int = 5
    metric_for_selection: str = "accuracy"
    greater_is_better: bool = True
    min_improvement: float = 0.0
    seed: int = 0
    disable_tqdm: bool = False
    # Rows gated GATE_SURGERY: drop the part of their summed gradient that conflicts with the other
    # rows' gradient (PCGrad between the two groups), every step, on every process alike.
    gradient_surgery: bool = False


@dataclass
class FinetuneResult:
    """What the fine-tune did, measured on the held-out verified samples."""

    adopted: bool
    scores_before: dict[str, float]
    scores_after: dict[str, float]  # of the kept weights: the starting ones when not adopted
    steps: int
    best_step: int  # 0 = the starting weights
    epochs: float  # passes over the fine-tune set
    num_samples: int
    stop_reason: str  # "completed" | "early_stopping" | "nan_loss"
    time_s: float
    history: list[dict[str, float]] = field(default_factory=list)


class GuardedFinetuner:
    """Fine-tunes `model` in place on a `FinetuneSet`, judged on held-out verified batches.

    Checkpoints are compared by held-out cross-entropy, which moves with every sample's probability
    rather than in steps of 1/n like accuracy on a few hundred samples; the best one is kept only if
    its `metric_for_selection` is not below the starting model's (plus `min_improvement`) and its
    cross-entropy is lower. Otherwise every parameter and buffer is restored exactly.
    """

    def __init__(self, model: nn.Module, args: FinetuneArguments, forward_fn: ForwardFn,
                 collate_fn: Optional[CollateFn] = None, compute_metrics: Optional[Any] = None) -> None:
        if args.penalty not in RETENTION_PENALTIES:
            raise ValueError(f"penalty must be one of {list(RETENTION_PENALTIES)}, got {args.penalty!r}.")
        self.model = model
        self.args = args
        self.forward_fn = forward_fn
        self.collate_fn = collate_fn or default_data_collator
        self.compute_metrics = compute_metrics

    def run(self, train_set: FinetuneSet, heldout: VerifiedSplit, heldout_fold: int, num_classes: int,
            penalty_set: Optional[FinetuneSet] = None, desc: str = "fine-tune") -> FinetuneResult:
        """Fine-tune for `args.max_steps`; `penalty_set` (verified rows) estimates the Fisher for `penalty="fisher"`."""
        args = self.args
        start_time = time.perf_counter()
        if len(train_set) == 0:
            raise ValueError("The fine-tune set is empty: nothing to train on.")
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad is False everywhere).")
        snapshot = ModelSnapshot(model)
        # Joins the existing Accelerate state (its processes and mixed precision); the model stays on its device.
        accelerator = Accelerator(device_placement=False)
        if args.gradient_surgery and accelerator.mixed_precision == "fp16":
            raise ValueError("Gradient surgery does not support fp16 loss scaling; use bf16 or full precision.")
        device = next(model.parameters()).device
        collator = _TargetCollator(self.collate_fn, num_classes, train_set.label_column)
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                            generator=torch.Generator().manual_seed(args.seed))
        steps_per_epoch = math.ceil(len(train_set) / (args.batch_size * accelerator.num_processes))
        total_steps = max(1, args.max_steps)
        eval_steps = args.eval_steps or max(1, math.ceil(total_steps / 10))
        penalize = args.penalty != "none" and args.penalty_strength > 0
        anchor = [p.detach().clone() for p in params] if penalize else []
        fisher = self._fisher(params, penalty_set, collator, accelerator, device) if penalize and args.penalty == "fisher" else None

        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        was_training = model.training
        prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)

        def penalty() -> Any:
            return args.penalty_strength / 2 * _penalty(params, anchor, fisher) if penalize else 0.0

        heldout_batches = list(heldout.batches(heldout_fold))  # a few hundred samples, read once

        def evaluate() -> dict[str, float]:
            model.eval()
            with accelerator.autocast():
                logits, labels = predict(model, heldout_batches, self.forward_fn)
            scores = compute_scores(logits, labels, self.compute_metrics)
            scores["loss"] = float(F.cross_entropy(logits.float(), labels.to(logits.device)))
            return scores

        sign = 1.0 if args.greater_is_better else -1.0
        before = evaluate()
        best: dict[str, Any] = {"step": 0, "scores": before, "state": None}
        history = [{"step": 0, **{f"heldout_{k}": v for k, v in before.items()}}]
        stop_reason, step, stale, epoch = "completed", 0, 0, 0
        progress = tqdm(total=total_steps, desc=f"hf_repair: {desc}", unit="step",
                        disable=args.disable_tqdm or not accelerator.is_main_process)
        # Dropout draws from the global generator: seed it for a reproducible repair, and give the
        # caller's generator back untouched afterwards.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            try:
                while step < total_steps and stop_reason == "completed":
                    if hasattr(loader, "set_epoch"):
                        loader.set_epoch(epoch)
                    for batch in loader:
                        loss, trusted = self._step(prepared, batch.to(device), params, optimizer, accelerator, penalty)
                        if loss is None:
                            stop_reason = "nan_loss"
                            break
                        step += 1
                        progress.update(1)
                        record = {"step": step, "train_loss": loss, "trusted_fraction": trusted}
                        logger.debug("%s step %d: loss %.4f, trusted weight %.3f", desc, step, loss, trusted)
                        if step % eval_steps == 0 or step == total_steps:
                            scores = evaluate()
                            record.update({f"heldout_{k}": v for k, v in scores.items()})
                            progress.set_postfix(heldout_loss=f"{scores['loss']:.4f}", heldout_accuracy=f"{scores['accuracy']:.3f}")
                            if scores["loss"] < best["scores"]["loss"]:
                                best = {"step": step, "scores": scores, "state": _cpu_state(model)}
                                stale = 0
                            else:
                                stale += 1
                                if stale >= args.patience:
                                    stop_reason = "early_stopping"
                        history.append(record)
                        if step >= total_steps or stop_reason != "completed":
                            break
                    epoch += 1
            except BaseException:
                snapshot.restore()
                raise
            finally:
                progress.close()
                _release(accelerator, model)
                model.train(was_training)

        adopted = stop_reason != "nan_loss" and best["state"] is not None and (
            sign * selection_value(best["scores"], args.metric_for_selection)
            >= sign * selection_value(before, args.metric_for_selection) + args.min_improvement
        )
        if stop_reason == "nan_loss":
            logger.warning("%s: the loss became NaN or inf at step %d; every weight is restored to its starting value.",
                           desc, step + 1)
        if adopted:
            with torch.no_grad():
                model.load_state_dict(best["state"])
        else:
            snapshot.restore()
            if stop_reason != "nan_loss":
                logger.info("%s: no checkpoint beat the starting model on held-out verified samples; the model is "
                            "left exactly as it was.", desc)
        return FinetuneResult(
            adopted=adopted,
            scores_before=before,
            scores_after=best["scores"] if adopted else before,
            steps=step,
            best_step=best["step"] if adopted else 0,
            epochs=step / steps_per_epoch,
            num_samples=len(train_set),
            stop_reason=stop_reason,
            time_s=time.perf_counter() - start_time,
            history=history,
        )

    def _step(self, prepared: nn.Module, batch: TargetBatch, params: list[nn.Parameter], optimizer: Any,
              accelerator: Accelerator, penalty: Callable[[], Any]) -> tuple[Optional[float], float]:
        """One optimizer step: (the loss, the batch's trusted weight share), or (None, ...) and no step on a NaN/inf loss."""
        surgery = self.args.gradient_surgery
        prepared.train()
        # Surgery reduces its gradients by hand: DDP must not expect its own backward.
        with (accelerator.no_sync(prepared) if surgery else contextlib.nullcontext()), accelerator.autocast():
            logits = self.forward_fn(prepared, batch.inputs)
        rows, trusted = _retention_terms(logits, batch, self.args.belief_power)
        regularizer = penalty()
        loss = rows.sum() / len(rows) + regularizer
        if _nonfinite_anywhere(loss):
            return None, trusted
        optimizer.zero_grad(set_to_none=True)
        if surgery:
            flagged = batch.gates == GATE_SURGERY
            _surgery_backward(rows[~flagged].sum() / len(rows) + regularizer, rows[flagged].sum() / len(rows), params,
                              accelerator)
        else:
            accelerator.backward(loss)
        optimizer.step()
        return float(loss.detach()), trusted

    def _fisher(self, params: list[nn.Parameter], data: Optional[FinetuneSet], collator: "_TargetCollator",
                accelerator: Accelerator, device: torch.device) -> list[torch.Tensor]:
        """Diagonal empirical Fisher on verified rows, normalised to mean 1 (so strengths compare with L2).

        Every process reads all the rows (a few hundred), so all hold the same Fisher without a collective.
        """
        if data is None or len(data) == 0:
            raise ValueError('penalty="fisher" needs verified samples to estimate the Fisher information.')
        fisher = [torch.zeros_like(p) for p in params]
        was_training = self.model.training
        self.model.eval()
        for batch in DataLoader(data, batch_size=self.args.batch_size, collate_fn=collator):
            batch = batch.to(device)
            with accelerator.autocast():
                logits = self.forward_fn(self.model, batch.inputs)
            loss = -(batch.targets * logits.float().log_softmax(-1)).sum(-1).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:  # a batch gradient squared, times its size, estimates the mean per-sample square
                    f.add_(g.detach().pow(2) * len(batch.labels))
        self.model.train(was_training)
        mean = float(sum(f.sum() for f in fisher)) / max(sum(f.numel() for f in fisher), 1)
        return [f / mean if mean > 0 else torch.ones_like(f) for f in fisher]


@torch.no_grad()
def predict_distributions(model: nn.Module, data: FinetuneSet, forward_fn: ForwardFn, collate_fn: Optional[CollateFn],
                          batch_size: int, num_classes: int) -> torch.Tensor:
    """Predicted class distributions (on CPU) for every row of `data`, in order.

    Every process predicts every row, so all hold identical results without a gather.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collator = _TargetCollator(collate_fn or default_data_collator, num_classes, data.label_column)
    try:
        return torch.cat([forward_fn(model, batch.to(device).inputs).float().softmax(-1).cpu()
                          for batch in DataLoader(data, batch_size=batch_size, collate_fn=collator)])
    finally:
        model.train(was_training)


def _retention_terms(logits: torch.Tensor, batch: TargetBatch, power: float) -> tuple[torch.Tensor, float]:
    """Per-row weighted cross-entropy; gated rows count as much as the model currently trusts their label.

    Returns the rows' terms (the loss is their sum over the batch size) and the batch's trusted weight share.
    """
    log_probs = logits.float().log_softmax(-1)
    per_row = -(batch.targets * log_probs).sum(-1)
    with torch.no_grad():
        trust = torch.ones_like(per_row)
        belief = batch.gates == GATE_BELIEF
        if belief.any():
            trust[belief] = log_probs[belief].gather(1, batch.labels[belief, None])[:, 0].exp().pow(power)
        agreement = batch.gates == GATE_AGREEMENT
        if agreement.any():
            trust[agreement] = (log_probs[agreement].argmax(-1) == batch.labels[agreement]).float()
    weights = batch.weights * trust
    return weights * per_row, float(weights.sum() / batch.weights.sum().clamp_min(1e-12))


def surgery_gradient(trusted: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """trusted + flagged, less the flagged gradient's component against the trusted one (if they conflict)."""
    dot = torch.dot(trusted, flagged)
    if dot < 0:
        flagged = flagged - dot / torch.dot(trusted, trusted).clamp_min(1e-30) * trusted
    return trusted + flagged


def _surgery_backward(trusted_loss: torch.Tensor, flagged_loss: torch.Tensor, params: list[nn.Parameter],
                      accelerator: Accelerator) -> None:
    """Set `.grad` to the surgery gradient of the two losses, averaged over processes in one collective."""
    flat = []
    for loss in (trusted_loss, flagged_loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    both = accelerator.reduce(torch.stack(flat), reduction="mean")
    combined = surgery_gradient(both[0], both[1])
    offset = 0
    for p in params:
        p.grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def _penalty(params: list[nn.Parameter], anchor: list[torch.Tensor], fisher: Optional[list[torch.Tensor]]) -> torch.Tensor:
    if fisher is None:
        return sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
    return sum((f * (p - a).pow(2)).sum() for p, a, f in zip(params, anchor, fisher))


def _nonfinite_anywhere(loss: torch.Tensor) -> bool:
    """True on every process as soon as one of them sees a NaN/inf loss, so all stop together."""
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    return bool(sum_across_processes(flag).item() > 0)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _release(accelerator: Accelerator, model: nn.Module) -> None:
    """Undo what `prepare` did to the user's model (autocast-patched forward, the prepared flag)."""
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.__dict__.pop("_is_accelerate_prepared", None)
