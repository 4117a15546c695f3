"""A short, guarded fine-tune: the retain step of beneficial retention and of the erase baseline.

Both repairs train the model briefly on a *fine-tune set* -- rows of model inputs, each with a
label (or a soft target), a weight and a gate that says how far the label is trusted -- and
differ only in which rows they put there. The loop runs on Accelerate (one process or
`accelerate launch`, mixed precision as the Accelerate state already says, the model left on its
device), can pull the weights towards the trained ones (an L2 or Fisher-weighted penalty), scores
held-out verified samples every few steps and keeps the checkpoint with the lowest held-out
cross-entropy only if its held-out metric is not below the starting model's and its held-out gain
passes the significance gate (the early stopping chose it on the same samples, so the gate is a
little optimistic here; a gain within noise is still refused). Otherwise, and on a NaN or inf loss,
every parameter and buffer is restored bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config.retention import RETENTION_PENALTIES
from ..data import CollateFn, VerifiedSplit
from ..evaluation import (
    ForwardFn,
    PairedComparison,
    compare_predictions,
    compute_scores,
    eval_mode,
    predict,
    selection_value,
)
from ..modeling.weights import ModelSnapshot
from ..utils.distributed import sum_across_processes
from .finetune_data import GATE_SURGERY, FinetuneSet, Mixup, TargetBatch, TargetCollator
from .losses import diagonal_fisher, retention_terms, surgery_backward, weight_penalty

logger = logging.getLogger(__name__)


@dataclass
class FinetuneArguments:
    """The knobs of one guarded fine-tune (filled from `RepairConfig` by the repairs)."""

    learning_rate: float
    max_steps: int
    batch_size: int
    belief_power: float = 1.0
    penalty: str = "none"
    penalty_strength: float = 0.0
    eval_steps: int | None = None
    patience: int = 5
    metric_for_selection: str = "accuracy"
    greater_is_better: bool = True
    min_improvement: float = 0.0
    significance_test: str = "mcnemar"
    significance_level: float = 0.05
    seed: int = 0
    disable_tqdm: bool = False
    # Rows gated GATE_SURGERY: drop the part of their summed gradient that conflicts with the other
    # rows' gradient (PCGrad between the two groups), every step, on every process alike.
    gradient_surgery: bool = False
    # Rows gated GATE_SMALL_LOSS: this share of each label's with the largest loss is left out of each step,
    # reached by a linear ramp over the first epoch (co-teaching's schedule: a network fits clean
    # samples first, so early losses do not yet tell them apart).
    small_loss_trim: float = 0.0
    # Rows gated GATE_FORWARD: the (true, given) noise transition their labels are learnt through.
    noise_transition: torch.Tensor | None = None
    # > 0: every step trains on the batch mixed with itself, lambda ~ Beta(mixup_alpha, mixup_alpha) (`Mixup`).
    mixup_alpha: float = 0.0


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
    comparison: PairedComparison | None = None  # the best checkpoint against the start (None: nothing scored)


class GuardedFinetuner:
    """Fine-tunes `model` in place on a `FinetuneSet`, judged on held-out verified batches.

    Checkpoints are compared by held-out cross-entropy, which moves with every sample's probability
    rather than in steps of 1/n like accuracy on a few hundred samples; the best one is kept only if
    its `metric_for_selection` is not below the starting model's (plus `min_improvement`), its
    cross-entropy is lower and its accuracy gain is significant (`significance_test`). Otherwise every
    parameter and buffer is restored exactly.
    """

    def __init__(self, model: nn.Module, args: FinetuneArguments, forward_fn: ForwardFn,
                 collate_fn: CollateFn | None = None, compute_metrics: Any | None = None) -> None:
        if args.penalty not in RETENTION_PENALTIES:
            raise ValueError(f"penalty must be one of {list(RETENTION_PENALTIES)}, got {args.penalty!r}.")
        self.model = model
        self.args = args
        self.forward_fn = forward_fn
        self.collate_fn = collate_fn
        self.compute_metrics = compute_metrics

    def run(self, train_set: FinetuneSet, heldout: VerifiedSplit, heldout_fold: int, num_classes: int,
            penalty_set: FinetuneSet | None = None, desc: str = "fine-tune") -> FinetuneResult:
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
        collator = TargetCollator(self.collate_fn, num_classes, train_set.label_column)
        mixer = Mixup(model, args.mixup_alpha, collator([train_set[0]]).inputs) if args.mixup_alpha > 0 else None
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                            generator=torch.Generator().manual_seed(args.seed))
        steps_per_epoch = math.ceil(len(train_set) / (args.batch_size * accelerator.num_processes))
        total_steps = max(1, args.max_steps)
        eval_steps = args.eval_steps or max(1, math.ceil(total_steps / 10))
        penalize = args.penalty != "none" and args.penalty_strength > 0
        anchor = [p.detach().clone() for p in params] if penalize else []
        fisher = None
        if penalize and args.penalty == "fisher":
            fisher = diagonal_fisher(model, params, penalty_set, collator, self.forward_fn, args.batch_size, accelerator,
                                     device)

        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)

        def penalty() -> Any:
            return args.penalty_strength / 2 * weight_penalty(params, anchor, fisher) if penalize else 0.0

        heldout_batches = list(heldout.batches(heldout_fold))  # a few hundred samples, read once

        def evaluate() -> tuple[dict[str, float], torch.Tensor]:
            with eval_mode(model), accelerator.autocast():
                logits, labels = predict(model, heldout_batches, self.forward_fn)
            return scores_with_loss(logits, labels, self.compute_metrics), (logits.argmax(-1) == labels).cpu()

        sign = 1.0 if args.greater_is_better else -1.0
        before, correct_before = evaluate()
        best: dict[str, Any] = {"step": 0, "scores": before, "state": None, "correct": correct_before}
        history = [{"step": 0, **{f"heldout_{k}": v for k, v in before.items()}}]
        stop_reason, step, stale, epoch = "completed", 0, 0, 0
        progress = tqdm(total=total_steps, desc=f"hf_repair: {desc}", unit="step",
                        disable=args.disable_tqdm or not accelerator.is_main_process)
        # Dropout draws from the global generator: seed it for a reproducible repair, and give the
        # caller's generator back untouched afterwards; `_step` trains, and the caller's train/eval mode
        # comes back afterwards.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
            torch.manual_seed(args.seed)
            try:
                while step < total_steps and stop_reason == "completed":
                    if hasattr(loader, "set_epoch"):
                        loader.set_epoch(epoch)
                    for batch in loader:
                        trim = args.small_loss_trim * min(1.0, (step + 1) / steps_per_epoch)
                        loss, trusted = self._step(prepared, batch.to(device), params, optimizer, accelerator, penalty,
                                                   trim, mixer)
                        if loss is None:
                            stop_reason = "nan_loss"
                            break
                        step += 1
                        progress.update(1)
                        record = {"step": step, "train_loss": loss, "trusted_fraction": trusted}
                        logger.debug("%s step %d: loss %.4f, trusted weight %.3f", desc, step, loss, trusted)
                        if step % eval_steps == 0 or step == total_steps:
                            scores, correct = evaluate()
                            record.update({f"heldout_{k}": v for k, v in scores.items()})
                            progress.set_postfix(heldout_loss=f"{scores['loss']:.4f}", heldout_accuracy=f"{scores['accuracy']:.3f}")
                            if scores["loss"] < best["scores"]["loss"]:
                                best = {"step": step, "scores": scores, "state": _cpu_state(model), "correct": correct}
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
                release_prepared(accelerator, model)

        comparison = compare_predictions(best["correct"], correct_before, test=args.significance_test,
                                         level=args.significance_level, seed=args.seed)
        adopted = stop_reason != "nan_loss" and best["state"] is not None and comparison.significant and (
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
                logger.info("%s: no checkpoint beat the starting model significantly on held-out verified samples "
                            "(best: %s); the model is left exactly as it was.", desc, comparison.describe())
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
            comparison=comparison,
        )

    def _step(self, prepared: nn.Module, batch: TargetBatch, params: list[nn.Parameter], optimizer: Any,
              accelerator: Accelerator, penalty: Callable[[], Any], trim: float,
              mixer: Mixup | None) -> tuple[float | None, float]:
        """One optimizer step: (the loss, the batch's trusted weight share), or (None, ...) and no step on a NaN/inf loss."""
        surgery = self.args.gradient_surgery
        prepared.train()
        # Surgery reduces its gradients by hand: DDP must not expect its own backward.
        with (mixer.mixed(batch) if mixer else contextlib.nullcontext(batch)) as batch, \
                (accelerator.no_sync(prepared) if surgery else contextlib.nullcontext()), accelerator.autocast():
            logits = self.forward_fn(prepared, batch.inputs)
        rows, trusted, kept = retention_terms(logits, batch, self.args.belief_power, trim, self.args.noise_transition)
        regularizer = penalty()
        loss = rows.sum() / kept + regularizer
        if nonfinite_anywhere(loss):
            return None, trusted
        optimizer.zero_grad(set_to_none=True)
        if surgery:
            flagged = batch.gates == GATE_SURGERY
            surgery_backward(rows[~flagged].sum() / kept + regularizer, rows[flagged].sum() / kept, params,
                             accelerator)
        else:
            accelerator.backward(loss)
        optimizer.step()
        return float(loss.detach()), trusted


def scores_with_loss(logits: torch.Tensor, labels: torch.Tensor, compute_metrics: Any | None) -> dict[str, float]:
    """The scores of `compute_metrics` (accuracy by default) and the cross-entropy that compares checkpoints."""
    scores = compute_scores(logits, labels, compute_metrics)
    scores["loss"] = float(F.cross_entropy(logits.float(), labels.to(logits.device)))
    return scores


def nonfinite_anywhere(loss: torch.Tensor) -> bool:
    """True on every process as soon as one of them sees a NaN/inf loss, so all stop together."""
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    return bool(sum_across_processes(flag).item() > 0)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def release_prepared(accelerator: Accelerator, model: nn.Module) -> None:
    """Undo what `prepare` did to the user's model (autocast-patched forward, the prepared flag)."""
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.__dict__.pop("_is_accelerate_prepared", None)
