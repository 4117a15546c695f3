"""The noise rate a refinement of `fresh` is refitted at: calibrated by predictions held out from the whole model.

Identification calibrates its noise rate by its probe's held-out confusion on the verified split: the probe is
fitted on some verified samples and predicts the others. That is the confusion the probe has on unseen samples
only where the network it reads never learnt the verified samples. `fresh` did: fine-tuned on them, its features
fit them, the probe is more accurate on them than on the training samples, and the calibration over-estimates
the noise (text: 0.429-0.454 for a true 0.40, BENCHMARKS.md). Erase and retrain flag that share of the training
set, and forward learns every label through the transition (a binary label kept with probability d carries a
signal proportional to 2d - 1).

`fresh`'s fold models give a confusion held out from the whole model: each was fine-tuned without its fold and
predicts it. The same models predict every training sample (each process its shard), and black-box shift
estimation solves for the joint distribution of (true, given) labels as identification's calibration does
(`NoiseRateCalibration`: the same solve, interval and warnings). They also say what share of the flags are wrong
labels (`flag_precision.py`): each flags as many training samples as the identification, by its given-label
log-probability, and the verified fold it did not learn shows how often a right or a wrong label falls below that.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit, column_array, pop_labels, training_batches
from ..evaluation import ForwardFn, eval_mode, input_names_for, predict
from ..identification import IdentificationResult, flag_lowest
from ..identification.flag_precision import FLAG_PRECISION_KEYS, FlagPrecisionEstimate, estimate_flag_precision
from ..identification.noise_rate import NoiseRateCalibration, NoiseRateEstimate
from ..utils.distributed import process_info, sum_across_processes
from .checkpoints import StateDict, load_weights

logger = logging.getLogger(__name__)


@dataclass
class FoldCalibration:
    """What fresh's fold models say about the training labels: the noise rate and transition they calibrate, and
    what estimating the flags' precision needs."""

    noise: NoiseRateEstimate
    heldout_log_probs: torch.Tensor  # (verified, C): each verified sample under the fold model that did not learn it
    heldout_labels: torch.Tensor  # (verified,)
    heldout_folds: torch.Tensor  # (verified,): the fold each row was held out of
    training_scores: torch.Tensor  # (folds, training samples): the given label's log-probability, dataset order

    def flag_precision(self, num_flagged: int, seed: int) -> FlagPrecisionEstimate | None:
        """The share of `num_flagged` flags that are wrong labels, each fold model flagging as many as its cut."""
        if num_flagged <= 0:
            return None
        cuts = self.training_scores.sort(dim=1).values[:, min(num_flagged, self.training_scores.shape[1]) - 1]
        return estimate_flag_precision(self.heldout_log_probs, self.heldout_labels, self.noise.transition,
                                       cuts[self.heldout_folds], "fresh_fold_models", seed, self.noise.rate,
                                       self.noise.interval)


def calibrate_on_fold_models(model: nn.Module, fold_weights: Callable[[int], StateDict], split: VerifiedSplit,
                             train_dataset: Any, config: RepairConfig, forward_fn: ForwardFn,
                             collate_fn: CollateFn | None) -> FoldCalibration:
    """The noise rate and transition P(given | true) calibrated by the models `fold_weights(f)`, each fine-tuned
    without verified fold f: their pooled predictions on the folds they did not learn against their mean
    prediction on the training samples by given label. Leaves the model with the last fold's weights.

    Two passes over the fold models (the calibration needs every held-out prediction first), so the training set is
    streamed: memory is one batch and one float per training sample and fold, not the training set's predictions.
    """
    rank, world = process_info()
    shard = np.arange(len(train_dataset), dtype=np.int64)[rank::world]
    input_names = input_names_for(model, forward_fn)
    heldout_log_probs, heldout_labels, heldout_folds = [], [], []
    training_scores = torch.zeros(split.num_folds, len(train_dataset), dtype=torch.float64)
    with eval_mode(model), torch.no_grad():
        for fold in range(split.num_folds):
            load_weights(model, fold_weights(fold))
            logits, labels = predict(model, split.batches(fold), forward_fn)
            heldout_log_probs.append(logits.double().log_softmax(-1).cpu())
            heldout_labels.append(labels.cpu())
            heldout_folds.append(torch.full((len(labels),), fold, dtype=torch.long))
        log_probs = torch.cat(heldout_log_probs)
        calibration = NoiseRateCalibration("fresh_fold_models", log_probs, torch.cat(heldout_labels),
                                           log_probs.shape[-1])
        for fold in range(split.num_folds):
            load_weights(model, fold_weights(fold))
            offset = 0
            for raw in training_batches(train_dataset, shard, config.label_column, input_names, collate_fn,
                                        config.batch_size):
                batch = dict(raw)
                given = torch.as_tensor(pop_labels(batch, config.label_column)).reshape(-1).long()
                inputs = {k: v.to(split.device) if torch.is_tensor(v) else v for k, v in batch.items()
                          if input_names is None or k in input_names}
                batch_log_probs = forward_fn(model, inputs).double().log_softmax(-1).cpu()
                calibration.update(batch_log_probs, given)
                rows = shard[offset : offset + len(given)]
                training_scores[fold, rows] = batch_log_probs.gather(1, given[:, None])[:, 0]
                offset += len(given)
    estimate = calibration.estimate(split.device, config.repair_seed)
    problems = estimate.problems()
    logger.info("method='auto': noise rate %.3f, interval [%.3f, %.3f], from fresh's fold models' held-out "
                "predictions%s; P(given = true | true) %s.", estimate.rate, *estimate.interval,
                f" (not reliable: {'; '.join(problems)})" if problems else "",
                [round(row[i], 3) for i, row in enumerate(estimate.transition)])
    return FoldCalibration(noise=estimate, heldout_log_probs=log_probs, heldout_labels=torch.cat(heldout_labels),
                           heldout_folds=torch.cat(heldout_folds),
                           training_scores=sum_across_processes(training_scores.to(split.device)).cpu())


def with_noise_rate(identification: IdentificationResult, calibration: FoldCalibration,
                    config: RepairConfig) -> IdentificationResult:
    """The identification with the calibration's noise rate and transition, its flags cut again at that rate where
    `flag_rule` is "noise_rate" (the scores and the other rules' flags do not depend on it), and the fold models'
    estimate of their precision in place of the identifying probe's (its features fitted the verified samples)."""
    estimate = calibration.noise
    problems = estimate.problems()
    summary = {key: value for key, value in identification.summary.items() if key not in FLAG_PRECISION_KEYS}
    summary.update({"estimated_noise_rate": estimate.rate, "estimated_noise_rate_interval": list(estimate.interval),
                    "noise_rate_source": estimate.reference, "noise_rate_warning": "; ".join(problems) or None,
                    "noise_transition": estimate.transition})
    table, flagged_indices = identification.table, identification.flagged_indices
    if config.flag_rule == "noise_rate":
        flagged, threshold = flag_lowest(column_array(table, "score"), config, estimate.rate)
        summary.update(num_flagged=int(flagged.sum()), threshold=threshold)
        table = table.remove_columns("flagged").add_column("flagged", flagged)
        flagged_indices = np.flatnonzero(flagged).astype(np.int64)
        if "is_corrupted" in table.column_names:
            corrupted = column_array(table, "is_corrupted").astype(bool)
            summary["precision"] = float((flagged & corrupted).sum() / max(flagged.sum(), 1))
            summary["recall"] = float((flagged & corrupted).sum() / max(corrupted.sum(), 1))
    precision = calibration.flag_precision(len(flagged_indices), config.repair_seed)
    summary.update(precision.summary() if precision else {})
    return dataclasses.replace(identification, table=table, summary=summary, flagged_indices=flagged_indices)
