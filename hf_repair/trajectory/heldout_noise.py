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
(`NoiseRateCalibration`: the same solve, interval and warnings).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit, column_array, pop_labels, training_batches
from ..evaluation import ForwardFn, eval_mode, input_names_for, predict
from ..identification import IdentificationResult, flag_lowest
from ..identification.noise_rate import NoiseRateCalibration, NoiseRateEstimate
from ..utils.distributed import process_info
from .checkpoints import StateDict, load_weights

logger = logging.getLogger(__name__)


def heldout_noise_rate(model: nn.Module, fold_weights: Callable[[int], StateDict], split: VerifiedSplit,
                       train_dataset: Any, config: RepairConfig, forward_fn: ForwardFn,
                       collate_fn: CollateFn | None) -> NoiseRateEstimate:
    """The noise rate and transition P(given | true) calibrated by the models `fold_weights(f)`, each fine-tuned
    without verified fold f: their pooled predictions on the folds they did not learn against their mean
    prediction on the training samples by given label. Leaves the model with the last fold's weights.

    Two passes over the fold models (the calibration needs every held-out prediction first), so the training set is
    streamed: memory is one batch, not the training set's predictions.
    """
    rank, world = process_info()
    shard = np.arange(len(train_dataset), dtype=np.int64)[rank::world]
    input_names = input_names_for(model, forward_fn)
    heldout_log_probs, heldout_labels = [], []
    with eval_mode(model), torch.no_grad():
        for fold in range(split.num_folds):
            load_weights(model, fold_weights(fold))
            logits, labels = predict(model, split.batches(fold), forward_fn)
            heldout_log_probs.append(logits.double().log_softmax(-1).cpu())
            heldout_labels.append(labels.cpu())
        log_probs = torch.cat(heldout_log_probs)
        calibration = NoiseRateCalibration("fresh_fold_models", log_probs, torch.cat(heldout_labels),
                                           log_probs.shape[-1])
        for fold in range(split.num_folds):
            load_weights(model, fold_weights(fold))
            for raw in training_batches(train_dataset, shard, config.label_column, input_names, collate_fn,
                                        config.batch_size):
                batch = dict(raw)
                given = torch.as_tensor(pop_labels(batch, config.label_column)).reshape(-1).long()
                inputs = {k: v.to(split.device) if torch.is_tensor(v) else v for k, v in batch.items()
                          if input_names is None or k in input_names}
                calibration.update(forward_fn(model, inputs).double().log_softmax(-1), given)
    estimate = calibration.estimate(split.device, config.repair_seed)
    problems = estimate.problems()
    logger.info("method='auto': noise rate %.3f, interval [%.3f, %.3f], from fresh's fold models' held-out "
                "predictions%s; P(given = true | true) %s.", estimate.rate, *estimate.interval,
                f" (not reliable: {'; '.join(problems)})" if problems else "",
                [round(row[i], 3) for i, row in enumerate(estimate.transition)])
    return estimate


def with_noise_rate(identification: IdentificationResult, estimate: NoiseRateEstimate,
                    config: RepairConfig) -> IdentificationResult:
    """The identification with `estimate` as its noise rate and transition, its flags cut again at that rate where
    `flag_rule` is "noise_rate" (the scores and the other rules' flags do not depend on it)."""
    problems = estimate.problems()
    summary = {**identification.summary, "estimated_noise_rate": estimate.rate,
               "estimated_noise_rate_interval": list(estimate.interval), "noise_rate_source": estimate.reference,
               "noise_rate_warning": "; ".join(problems) or None, "noise_transition": estimate.transition}
    if config.flag_rule != "noise_rate":
        return dataclasses.replace(identification, summary=summary)
    flagged, threshold = flag_lowest(column_array(identification.table, "score"), config, estimate.rate)
    summary.update(num_flagged=int(flagged.sum()), threshold=threshold)
    table = identification.table.remove_columns("flagged").add_column("flagged", flagged)
    if "is_corrupted" in table.column_names:
        corrupted = column_array(table, "is_corrupted").astype(bool)
        summary["precision"] = float((flagged & corrupted).sum() / max(flagged.sum(), 1))
        summary["recall"] = float((flagged & corrupted).sum() / max(corrupted.sum(), 1))
    return dataclasses.replace(identification, table=table, summary=summary,
                               flagged_indices=np.flatnonzero(flagged).astype(np.int64))
