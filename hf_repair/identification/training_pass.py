"""The training-set pass of identification: every sample's scores, streamed and sharded across processes.

Each process scores `indices[rank::world]` in batches against the verified statistics; the per-sample
values (one row of `FIELDS` each) are gathered back in dataset order, identical on every process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RepairConfig
from ..data import CollateFn, pop_labels, training_batches
from ..evaluation import ForwardFn
from ..modeling.hooks import LayerCapture
from ..projection.pipeline import project
from ..utils.distributed import gather_uneven, is_main_process, process_info
from .noise_rate import NoiseRateCalibration, NoiseRateEstimate
from .verified_pass import VerifiedPass

logger = logging.getLogger(__name__)

# Per-sample values gathered across processes, as columns of one float64 tensor.
FIELDS = ("index", "influence", "influence_mean", "loss", "prediction", "refit", "refit_prediction", "probe",
          "probe_prediction", "projection", "projection_prediction")


def projected_reference(model: nn.Module, verified: Any, config: RepairConfig, forward_fn: ForwardFn,
                        collate_fn: CollateFn | None) -> nn.Module:
    """A projection-repaired copy of the model: the reference of the 'projection' score."""
    projected = copy.deepcopy(model)
    result = project(projected, dataclasses.replace(config, method="projection"), verified, forward_fn=forward_fn,
                     collate_fn=collate_fn)
    logger.info("Projection reference: %s", "adopted" if result.adopted else "not adopted (equals the trained model)")
    return projected.eval()


def score_training_set(
    model: nn.Module,
    projected: nn.Module | None,
    dataset: datasets.Dataset,
    scorer: VerifiedPass,
    config: RepairConfig,
    forward_fn: ForwardFn,
    collate_fn: CollateFn | None,
    input_names: set[str] | None,
    device: torch.device,
    keep_reference_log_probs: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, NoiseRateEstimate]]:
    """(N, len(FIELDS)) per-sample values in dataset order, with `keep_reference_log_probs` the (N, classes)
    log-probabilities of the reference that suggests labels (the probe, else the refit, the projection or the
    model, as `build_result` picks), and the noise rate calibrated by each clean reference (probe, refit); all
    identical on every process."""
    rank, world = process_info()
    indices = np.arange(len(dataset), dtype=np.int64)[rank::world]
    influence = scorer.influence
    aggregate = _AGGREGATIONS[config.influence_aggregation]
    weights = influence.class_counts / influence.class_counts.sum()
    references = {"probe": scorer.probe, "refit": scorer.refit}
    calibrations = {
        name: NoiseRateCalibration(name, reference.heldout_log_probs, scorer.verified_labels, scorer.num_classes)
        for name, reference in references.items() if reference is not None
    }
    width = len(FIELDS) + (scorer.num_classes if keep_reference_log_probs else 0)  # the distribution after the fields
    rows: list[torch.Tensor] = []
    progress = tqdm(total=len(indices), desc="hf_repair: scoring training samples", unit="sample",
                    disable=config.repair_disable_tqdm or not is_main_process())
    offset = 0
    with LayerCapture(scorer.modules(), track_grad=influence.needs_backward) as capture:
        for raw in training_batches(dataset, indices, config.label_column, input_names, collate_fn, config.batch_size):
            batch = dict(raw)
            labels = torch.as_tensor(pop_labels(batch, config.label_column)).reshape(-1).long().to(device)
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                      if input_names is None or k in input_names}
            n = labels.shape[0]
            capture.clear()
            with torch.set_grad_enabled(influence.needs_backward):
                logits = forward_fn(model, inputs)
            per_class = influence.class_influence(capture, logits, labels).cpu()
            given = labels.cpu()
            out = torch.full((n, width), math.nan, dtype=torch.float64)
            out[:, FIELDS.index("index")] = torch.as_tensor(indices[offset : offset + n], dtype=torch.float64)
            out[:, FIELDS.index("influence")] = aggregate(per_class, weights, scorer.blind_classes)
            out[:, FIELDS.index("influence_mean")] = _aggregate_mean(per_class, weights, scorer.blind_classes)
            own_log_probs = logits.detach().double().log_softmax(-1).cpu()
            _put(out, "loss", "prediction", own_log_probs, given)
            if scorer.refit is not None:
                head_rows = scorer.head.input_rows(capture.inputs[scorer.head.name], n, torch.float64)
                refit_log_probs = scorer.refit.log_probs(head_rows[:, 0].cpu())
                _put(out, "refit", "refit_prediction", refit_log_probs, given)
                calibrations["refit"].update(refit_log_probs, given)
            if scorer.probe is not None:
                probe_log_probs = scorer.probe.log_probs(capture.inputs[scorer.probe_layer[0]].cpu())
                _put(out, "probe", "probe_prediction", probe_log_probs, given)
                calibrations["probe"].update(probe_log_probs, given)
            if projected is not None:
                with torch.no_grad():
                    projected_log_probs = forward_fn(projected, inputs).double().log_softmax(-1).cpu()
                _put(out, "projection", "projection_prediction", projected_log_probs, given)
            if keep_reference_log_probs:
                out[:, len(FIELDS):] = (probe_log_probs if scorer.probe is not None else refit_log_probs
                                        if scorer.refit is not None else projected_log_probs
                                        if projected is not None else own_log_probs)
            rows.append(out)
            offset += n
            progress.update(n)
    progress.close()
    local = torch.cat(rows) if rows else torch.zeros(0, width, dtype=torch.float64)
    gathered = gather_uneven(local.to(device)).cpu().numpy()
    gathered = gathered[np.argsort(gathered[:, 0], kind="stable")]
    noise_rates = {name: calibration.estimate(device, config.repair_seed) for name, calibration in calibrations.items()}
    reference_log_probs = gathered[:, len(FIELDS):].astype(np.float32) if keep_reference_log_probs else None
    return gathered[:, :len(FIELDS)], reference_log_probs, noise_rates


def _put(out: torch.Tensor, score: str, prediction: str, log_probs: torch.Tensor, given: torch.Tensor) -> None:
    """Write a reference's log-likelihood of the given label and its predicted label into the batch's rows."""
    out[:, FIELDS.index(score)] = log_probs.gather(1, given[:, None])[:, 0]
    out[:, FIELDS.index(prediction)] = log_probs.argmax(-1).double()


def _aggregate_mean(per_class: torch.Tensor, weights: torch.Tensor, blind: list[int]) -> torch.Tensor:
    return per_class @ weights.to(per_class)


def _aggregate_balanced(per_class: torch.Tensor, weights: torch.Tensor, blind: list[int]) -> torch.Tensor:
    seen = [c for c in range(per_class.shape[1]) if c not in blind]
    return per_class[:, seen].mean(1)


def _aggregate_min(per_class: torch.Tensor, weights: torch.Tensor, blind: list[int]) -> torch.Tensor:
    seen = [c for c in range(per_class.shape[1]) if c not in blind]
    return per_class[:, seen].min(1).values


def _aggregate_negative(per_class: torch.Tensor, weights: torch.Tensor, blind: list[int]) -> torch.Tensor:
    return per_class.clamp(max=0.0).sum(1)


_AGGREGATIONS = {
    "mean": _aggregate_mean,
    "balanced": _aggregate_balanced,
    "min": _aggregate_min,
    "negative_sum": _aggregate_negative,
}
