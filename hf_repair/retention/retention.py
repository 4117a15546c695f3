"""Beneficial-retention repair (Huang, Zhao, Huang, Pan, NeurIPS 2023) and the erase baseline.

Three steps, each measurable on its own (`method.md`, Method 2):

1. Identify: `hf_repair.identification` scores every training sample with the verified split and
   flags the harmful-looking ones (or pass a `Repairer.identify` result to reuse).
2. Separate: a flagged sample's input is kept; its label is trusted only as far as the model being
   repaired believes it. The default (`separation="belief"`) weights each flagged sample's
   cross-entropy by the current probability of its given label, p(y|x)^belief_power, held constant
   (the gradient of the generalised cross-entropy of Zhang & Sabuncu 2018 at q = belief_power).
   A corrupted label the repaired model contradicts fades out; a clean sample that identification
   wrongly flagged comes back as the model relearns its class. `"agreement"` keeps a flagged label
   only while the model predicts it; `"soft"` trains flagged samples towards the model's predicted
   distribution (the naive reading of method.md, kept for comparison: it distils the model's
   mistakes and measured worse than erase).
3. Retain: a guarded fine-tune (`finetuner.GuardedFinetuner`) on the verified training folds, the unflagged
   samples and the flagged ones, judged on the held-out verified fold; each stage is kept only if it
   is not worse there than where it started.

`method="erase"` is the same fine-tune with the flagged samples removed (the baseline the paper
argues against); `method="projection+retention"` projects first (`hf_repair.projection`) and retains
from the projected model, and `"projection+erase"` erases from it (the baseline for that one).

What we measured (benchmarks/retention.py; BENCHMARKS.md) set the design: the belief is only as
good as the model that holds it, and a model that memorised its noisy labels believes them.
Retaining flagged samples straight from the trained weights lost to erase in every variant we tried
(online belief, agreement, a projected reference's belief); with a warm-up on the trusted rows first
it ties erase. From the projected model, which no longer believes what it memorised, the belief rule
beats erasing from that same model when half the flagged samples are clean. Hence `retention`
warms up (`retention_warmup`, 0.5 of the budget) and `projection+retention`, the recommended method,
needs no warm-up (unless its projection was not adopted).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit, check_label_range, column_array, model_columns, stratified_folds
from ..evaluation import ForwardFn, eval_mode, input_names_for
from ..identification import IdentificationResult
from ..utils.distributed import process_info
from .checks import input_columns
from .finetune_data import (
    GATE_AGREEMENT,
    GATE_BELIEF,
    GATE_FORWARD,
    GATE_NONE,
    GATE_SMALL_LOSS,
    GATE_SURGERY,
    FinetuneSet,
    predict_distributions,
)
from .finetuner import FinetuneArguments, FinetuneResult, GuardedFinetuner

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 5e-4  # retention_learning_rate=None outside RepairCallback

HELDOUT_FOLD = 0  # the verified fold that judges the fine-tune; the other folds are trained on
_GATES = {"belief": GATE_BELIEF, "agreement": GATE_AGREEMENT, "soft": GATE_NONE, "surgery": GATE_SURGERY}


def erases(method: str) -> bool:
    """Whether the method drops the flagged samples (the baseline) rather than retaining them."""
    return method.endswith("erase")


def projects_first(method: str) -> bool:
    """Whether the method projects (`hf_repair.projection`) before it fine-tunes."""
    return method.startswith("projection+")


@dataclass
class RetentionResult:
    """What the fine-tuning repairs did, stage by stage."""

    method: str
    num_train: int
    num_flagged: int
    num_trusted: int  # verified training rows + unflagged training rows
    total_steps: int  # the step budget shared by the stages
    stages: list[tuple[str, FinetuneResult]] = field(default_factory=list)
    skipped: str | None = None  # why no fine-tune ran

    @property
    def scores_before(self) -> dict[str, float] | None:
        return self.stages[0][1].scores_before if self.stages else None

    @property
    def scores_after(self) -> dict[str, float] | None:
        return self.stages[-1][1].scores_after if self.stages else None


class RetentionRepair:
    """Erase or retain the flagged training samples with a short guarded fine-tune, in place."""

    def __init__(self, model: nn.Module, config: RepairConfig, *, forward_fn: ForwardFn, collate_fn: CollateFn | None,
                 compute_metrics: Any | None) -> None:
        self.model = model
        self.config = config
        self.forward_fn = forward_fn
        self.collate_fn = collate_fn
        self.compute_metrics = compute_metrics
        self.input_names = input_names_for(model, forward_fn)

    def run(self, verified: datasets.Dataset, split: VerifiedSplit, train_dataset: datasets.Dataset,
            identification: IdentificationResult, projected: bool = False,
            noise_transition: torch.Tensor | None = None,
            training_weights: np.ndarray | None = None) -> RetentionResult:
        """Fine-tune in place; `projected`: the model was just projected (so it needs no warm-up).

        `noise_transition`: learn the unflagged training samples through this (true, given) transition of their
        labels (forward correction, `GATE_FORWARD`) instead of taking their labels as true; with no sample
        flagged, every training sample is (method "auto"'s "forward").
        `training_weights`: one weight per training sample in [0, 1], its loss multiplied by it (the probability
        that its label is right, `label_confidence`); with no sample flagged, every training sample trains, weighed
        (method "auto"'s "reweight"). Verified samples keep weight 1.
        """
        config = self.config
        if noise_transition is not None and config.small_loss_trim > 0:
            raise ValueError("small_loss_trim and a noise transition both decide how far the unflagged training labels "
                             "are trusted; use one of them (small_loss_trim=0 with the transition).")
        if config.mixup_alpha > 0 and (noise_transition is not None or not erases(config.method)):
            raise ValueError(f"mixup_alpha mixes fully trusted rows only, so it runs with method 'erase' (or 'auto''s "
                             f"retrain) without a noise transition; method {config.method!r}"
                             f"{' with a noise transition' if noise_transition is not None else ''} cannot use it.")
        columns = input_columns(train_dataset, verified, config.label_column, self.input_names)
        labels = column_array(train_dataset, config.label_column).astype(np.int64)
        flagged = np.unique(np.asarray(identification.flagged_indices, dtype=np.int64))
        if flagged.size and (flagged[0] < 0 or flagged[-1] >= len(train_dataset)):
            raise ValueError(
                f"The identification flags indices up to {int(flagged[-1])}, but the training set has {len(train_dataset)} "
                f"rows: it was computed on another dataset. Identify on the training set you pass to repair()."
            )
        unflagged = np.setdiff1d(np.arange(len(train_dataset)), flagged)
        verified_rows, verified_labels = self._verified_training_rows(split)
        num_classes = self._num_classes(split)
        check_label_range(labels, num_classes)
        check_label_range(verified_labels, num_classes)
        if noise_transition is not None and tuple(noise_transition.shape) != (num_classes, num_classes):
            raise ValueError(f"The noise transition is {tuple(noise_transition.shape)}, but the model predicts {num_classes} "
                             f"classes: pass a ({num_classes}, {num_classes}) matrix of P(given | true).")

        _, world = process_info()
        batch_size = config.retention_batch_size or config.batch_size
        total_steps = max(1, math.ceil(config.retention_epochs * len(train_dataset) / (batch_size * world)))
        outcome = RetentionResult(method=config.method, num_train=len(train_dataset), num_flagged=int(flagged.size),
                                   num_trusted=len(verified_rows) + len(unflagged), total_steps=total_steps)
        if training_weights is not None:
            training_weights = np.asarray(training_weights, dtype=np.float32)
            if training_weights.shape != (len(train_dataset),):
                raise ValueError(f"training_weights needs one weight per training sample ({len(train_dataset)}), got "
                                 f"shape {training_weights.shape}.")
            bad = np.flatnonzero(~np.isfinite(training_weights) | (training_weights < 0) | (training_weights > 1))
            if bad.size:
                raise ValueError(f"training_weights must lie in [0, 1] (a probability that the label is right); {bad.size} "
                                 f"do not, e.g. {training_weights[bad[0]]} for training sample {bad[0]}.")
        if flagged.size == 0 and noise_transition is None and training_weights is None:
            outcome.skipped = ("identification flagged no training sample, so there is nothing to erase or retain; "
                               "the model is left as it is (flag more, e.g. flag_rule='budget' with flag_fraction)")
            logger.warning("hf_repair %s: %s.", config.method, outcome.skipped)
            return outcome
        if unflagged.size == 0:
            logger.warning(
                "hf_repair %s: identification flagged every training sample; the trusted rows are the %d verified "
                "training samples alone%s.", config.method, len(verified_rows),
                "" if erases(config.method) else ", and the flagged samples are admitted only after the warm-up")

        # Rows: the verified training folds (part 0), then every training sample (part 1), read in place.
        with_labels = columns + [config.label_column]  # collators may expect the label; batches drop it again
        parts = [verified.select_columns(with_labels), train_dataset.select_columns(with_labels)]
        weights = None if training_weights is None else np.concatenate(
            [np.ones(len(verified_rows), dtype=np.float32), training_weights])
        table = FinetuneSet(parts, np.repeat([0, 1], [len(verified_rows), len(labels)]),
                            np.concatenate([verified_rows, np.arange(len(labels))]),
                            np.concatenate([verified_labels, labels]), weights=weights, label_column=config.label_column)
        offset = len(verified_rows)
        trusted_rows = np.concatenate([np.arange(offset), offset + unflagged])
        # the unflagged training rows may still hold corruption that identification missed; verified rows may not
        unflagged_gate = (GATE_FORWARD if noise_transition is not None
                          else GATE_SMALL_LOSS if config.small_loss_trim > 0 else GATE_NONE)
        trusted_gates = np.repeat([GATE_NONE, unflagged_gate], [offset, len(unflagged)])
        trusted = table.subset(trusted_rows, trusted_gates)
        penalty_set = table.subset(np.arange(offset)) if config.retention_penalty == "fisher" else None
        warmup_steps = 0 if erases(config.method) else int(round(retention_warmup(config, projected) * total_steps))
        plan = [("erase", total_steps)] if erases(config.method) else [
            ("warm-up", warmup_steps), ("retain", total_steps - warmup_steps)]

        for stage, steps in plan:
            if steps <= 0:
                continue
            if stage == "retain":
                rows = np.concatenate([trusted_rows, offset + flagged])
                gates = np.concatenate([trusted_gates, np.full(len(flagged), _GATES[config.separation])])
                soft = None
                if config.separation == "soft":
                    soft = self._soft_targets(table.subset(offset + flagged), len(trusted_rows), num_classes, batch_size)
                data = table.subset(rows, gates, soft)
            else:
                data = trusted
            args = self._finetune_arguments(steps, batch_size, seed=config.repair_seed + len(outcome.stages),
                                            gradient_surgery=stage == "retain" and config.separation == "surgery",
                                            noise_transition=noise_transition)
            result = GuardedFinetuner(self.model, args, self.forward_fn, self.collate_fn, self.compute_metrics).run(
                data, split, HELDOUT_FOLD, num_classes, penalty_set=penalty_set, desc=f"{config.method} {stage}")
            outcome.stages.append((stage, result))
            if result.stop_reason == "nan_loss":
                break  # the stage restored its starting weights; later stages would start from the same place
        return outcome

    def run_on_verified(self, verified: datasets.Dataset, split: VerifiedSplit, epochs: float) -> FinetuneResult:
        """Fine-tune in place on the verified training folds alone, `epochs` passes over them, judged and stopped
        early on the held-out fold like the stages above (method "auto"'s "fresh": no noisy label is seen)."""
        config = self.config
        columns = [c for c in model_columns(verified, config.label_column, self.input_names) if c != config.label_column]
        rows, labels = self._verified_training_rows(split)
        num_classes = self._num_classes(split)
        check_label_range(labels, num_classes)
        table = FinetuneSet([verified.select_columns(columns + [config.label_column])], np.zeros(len(rows)), rows,
                            labels, label_column=config.label_column)
        _, world = process_info()
        batch_size = config.retention_batch_size or config.batch_size
        steps = max(1, math.ceil(epochs * len(rows) / (batch_size * world)))
        # mixup_alpha is erase's: the verified rows alone are clean, there is no missed corruption to guard against
        args = replace(self._finetune_arguments(steps, batch_size, seed=config.repair_seed, gradient_surgery=False),
                       mixup_alpha=0.0)
        return GuardedFinetuner(self.model, args, self.forward_fn, self.collate_fn, self.compute_metrics).run(
            table, split, HELDOUT_FOLD, num_classes, desc="fresh fine-tune")

    def _finetune_arguments(self, steps: int, batch_size: int, seed: int, gradient_surgery: bool,
                            noise_transition: torch.Tensor | None = None) -> FinetuneArguments:
        config = self.config
        return FinetuneArguments(
            learning_rate=finetune_learning_rate(config),
            max_steps=steps,
            batch_size=batch_size,
            belief_power=config.belief_power,
            penalty=config.retention_penalty,
            penalty_strength=config.retention_penalty_strength,
            eval_steps=config.retention_eval_steps,
            patience=config.retention_patience,
            metric_for_selection=config.metric_for_selection,
            greater_is_better=config.repair_greater_is_better,
            min_improvement=config.min_improvement,
            significance_test=config.significance_test,
            significance_level=config.significance_level,
            seed=seed,
            disable_tqdm=config.repair_disable_tqdm,
            gradient_surgery=gradient_surgery,
            small_loss_trim=config.small_loss_trim,
            noise_transition=noise_transition,
            mixup_alpha=config.mixup_alpha,
        )

    def _verified_training_rows(self, split: VerifiedSplit) -> tuple[np.ndarray, np.ndarray]:
        """The verified rows a fine-tune trains on (every fold but `HELDOUT_FOLD`), and their labels."""
        folds = stratified_folds(np.asarray(split.labels_all), split.num_folds, self.config.repair_seed)
        rows = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != HELDOUT_FOLD]))
        return rows, np.asarray(split.labels_all)[rows]

    def _num_classes(self, split: VerifiedSplit) -> int:
        batch = next(iter(split.batches(HELDOUT_FOLD)))
        with eval_mode(self.model), torch.no_grad():  # a forward in train mode would move BatchNorm statistics
            return int(self.forward_fn(self.model, batch.inputs).shape[-1])

    def _soft_targets(self, flagged: FinetuneSet, first: int, num_classes: int, batch_size: int) -> dict[int, torch.Tensor]:
        """The current model's predicted distributions for the flagged rows, keyed by their position in the retain set."""
        probabilities = predict_distributions(self.model, flagged, self.forward_fn, self.collate_fn,
                                              batch_size, num_classes)
        return {first + i: p for i, p in enumerate(probabilities)}


def finetune_learning_rate(config: RepairConfig) -> float:
    """The fine-tunes' learning rate: `retention_learning_rate` (RepairCallback fills in the Trainer's), else the default."""
    return config.retention_learning_rate or DEFAULT_LEARNING_RATE


def retention_warmup(config: RepairConfig, projected: bool = False) -> float:
    """The warm-up share: measured, a model fresh from memorising its labels must unlearn them first.

    A model the projection just repaired has (its belief is what the flagged samples are weighed by);
    one whose projection was not adopted has not, and warms up like `retention`.
    """
    if config.retention_warmup is not None:
        return config.retention_warmup
    return 0.0 if projected else 0.5
