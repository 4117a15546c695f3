"""Find the training samples that hurt a model, ranked, using only the trained model and a verified split.

Every training sample gets a score (lower = more harmful), a suggested label and a flag. Scores:

- `probe` (the default where the model allows it, `score="auto"`): the given label's log-likelihood under
  a softmax regression fitted on the verified split from the features the classifier MLP reads. A network
  memorises its noisy labels mostly in the layers next to the logits; this reference is not fooled by it.
- `refit`: the same under the classification head refitted on the verified split.
- `influence`: first-order influence of the sample on the verified loss, s(z) = g_z^T H^-1 g_clean
  (`hf_repair.influence`), with per-class verified gradients. It is the first-order change of the
  sample's given-label log-likelihood under a damped Newton step on the verified loss; the refit takes
  that step to convergence.
- `projection`: the given label's log-likelihood under the projection-repaired model (a copy).
- `combined`: the mean of the normalised ranks of `combine_scores`.
- `loss`: the trained model's own given-label log-likelihood (the loss-ranking baseline).

Flagging (`flag_rule`): by default the estimated noise rate's share of lowest scores, the rate being the
share of given labels the probe disagrees with, corrected for the probe's held-out error on the verified
split; or every score below a threshold; or a fixed budget. The suggested label is the probe's prediction.

The training set is streamed in batches, sharded `indices[rank::world]` across processes under
`accelerate launch`, and gathered back in dataset order; memory is bounded by the tracked layers (plus
the verified split's features for the probe and the refit), not by the training set.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RepairConfig
from ..data import (
    CollateFn,
    LabeledBatch,
    VerifiedSplit,
    check_label_range,
    column_array,
    model_input_names,
    pop_labels,
    training_batches,
)
from ..evaluation import ForwardFn, default_forward
from ..modeling.targets import find_target_modules
from ..projection.pipeline import project
from ..utils.distributed import gather_uneven, is_main_process, process_info
from .influence import HeadRefit, InfluenceModel, LayerCapture, LinearProbe, TrackedLayer, fit_probe, refit_head
from .ranking import auroc, average_ranks, flag_lowest

logger = logging.getLogger(__name__)


# Per-sample values gathered across processes, as columns of one float64 tensor.
_FIELDS = ("index", "influence", "influence_mean", "loss", "prediction", "refit", "refit_prediction", "probe",
           "probe_prediction", "projection", "projection_prediction")


@dataclass
class IdentificationResult:
    """Returned by `identify_harmful` / `Repairer.identify`.

    `table` has one row per training sample in dataset order: `index`, `score` (lower = more harmful),
    `given_label`, `suggested_label`, `flagged`, `is_corrupted` (when the training set has it) and one
    column per score that was computed (`probe`, `influence` and `loss` always where the model allows them,
    `refit` and `projection` when asked for). `summary` holds the counts, the flag rule and its threshold,
    the score's name, the estimated noise rate, the classes the verified split lacks (`blind_classes`),
    timings, and precision / recall / AUROC when the training set has `is_corrupted`.

    Example:
        >>> ident = Repairer(model, RepairConfig()).identify(train_dataset, verified)
        >>> ident.table.to_pandas().sort_values("score").head()  # the most harmful samples first
        >>> cleaned = train_dataset.select(np.setdiff1d(np.arange(len(train_dataset)), ident.flagged_indices))
    """

    table: datasets.Dataset
    summary: dict[str, Any]
    flagged_indices: np.ndarray

    def __repr__(self) -> str:
        s = self.summary
        text = (
            f"IdentificationResult(score={s['score']!r}, num_samples={s['num_samples']}, num_flagged={s['num_flagged']}, "
            f"flag_rule={s['flag_rule']!r}, estimated_noise_rate={s['estimated_noise_rate']:.4f}"
        )
        if "auroc" in s:
            text += f", precision={s['precision']:.4f}, recall={s['recall']:.4f}, auroc={s['auroc']:.4f}"
        return text + ")"


def identify_harmful(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    verified: Any,
    config: Optional[RepairConfig] = None,
    *,
    forward_fn: Optional[ForwardFn] = None,
    collate_fn: Optional[CollateFn] = None,
) -> IdentificationResult:
    """Score, rank and flag every training sample with the verified split; the model is left unchanged.

    Args:
        model: the trained classifier (called as `model(**inputs)` unless `forward_fn` is given).
        train_dataset: the `datasets.Dataset` it was trained on, with model inputs and `config.label_column`.
        verified: the verified split (a `datasets.Dataset` or a DataLoader of dict batches), as for `repair`.
        config: `score`, `flag_rule`, `influence_modules`, `damping`, ... (`RepairConfig()` by default).
        forward_fn: `forward_fn(model, inputs) -> logits` for models not called as `model(**inputs)`.
        collate_fn: batches samples of both datasets (e.g. `DataCollatorWithPadding(tokenizer)`).
    """
    start = time.perf_counter()
    config = config or RepairConfig()
    forward_fn = forward_fn or default_forward
    labels = _check_train_dataset(train_dataset, config.label_column)
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters; identification needs a trained model.")
    device = next(model.parameters()).device
    input_names = None if forward_fn is not default_forward else model_input_names(model)
    split = VerifiedSplit(
        verified,
        num_folds=config.num_folds,
        batch_size=config.batch_size,
        seed=config.repair_seed,
        label_column=config.label_column,
        collate_fn=collate_fn,
        input_names=input_names,
        device=device,
    )
    was_training = model.training
    model.eval()
    timings: dict[str, float] = {}
    try:
        layers = _select_layers(model, split, config, forward_fn)
        _check_train_label_range(labels, layers.num_classes)
        check_label_range(np.asarray(split.labels_all), layers.num_classes)
        score = _resolve_score(config, layers)
        components = list(config.combine_scores) if score == "combined" else [score]
        tic = time.perf_counter()
        scorer = _VerifiedPass(model, layers, config, forward_fn).run(split, refit="refit" in components)
        timings["verified_pass_s"] = time.perf_counter() - tic
        projected = None
        if "projection" in components:
            tic = time.perf_counter()
            projected = _projected_copy(model, verified, config, forward_fn, collate_fn)
            timings["projection_repair_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        values = _score_training_set(
            model, projected, train_dataset, scorer, config, forward_fn, collate_fn, input_names, device
        )
        timings["train_pass_s"] = time.perf_counter() - tic
    finally:
        model.train(was_training)

    timings["identify_time_s"] = time.perf_counter() - start
    return _build_result(values, labels, train_dataset, scorer, config, score, components, timings)


# ----------------------------------------------------------------------------------------------
# input checks


def _check_train_dataset(dataset: Any, label_column: str) -> np.ndarray:
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty (0 rows); pass the dataset the model was trained on.")
    if label_column not in columns:
        raise ValueError(
            f"The training dataset has no {label_column!r} column (columns: {columns}). Rename its label column, "
            f"e.g. dataset.rename_column('label', {label_column!r}), or set RepairConfig.label_column."
        )
    labels = column_array(dataset, label_column)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Training labels in {label_column!r} must be integer class ids (one per row), got dtype {labels.dtype} "
            f"and shape {labels.shape}."
        )
    return labels.astype(np.int64)


def _check_train_label_range(labels: np.ndarray, num_classes: int) -> None:
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ValueError(
            f"Training labels {bad.tolist()[:10]} are outside the model's {num_classes} classes (0..{num_classes - 1}). "
            f"Map them to the model's label ids (model.config.label2id) or drop those rows."
        )


def _resolve_score(config: RepairConfig, layers: "_Layers") -> str:
    """'auto' is the probe (the best score measured), else the influence; a score the model cannot give is an error."""
    no_head = "no layer's output is the logits themselves"
    if config.score == "auto":
        if layers.probe is not None:
            return "probe"
        logger.info("score='auto': no probe (%s); using the influence score.", layers.probe_problem)
        return "influence"
    components = list(config.combine_scores) if config.score == "combined" else [config.score]
    if "probe" in components and layers.probe is None:
        raise ValueError(
            f"score={config.score!r} needs the 'probe' score, which needs a layer with one input row per sample "
            f"before the logits ({layers.probe_problem}). Set probe_module, or use score='influence'."
        )
    if "refit" in components and layers.head is None:
        raise ValueError(
            f"score={config.score!r} needs the 'refit' score, which needs a classification head whose output is the "
            f"logits ({no_head}). Use score='influence' or 'probe', or set combine_scores."
        )
    return config.score


# ----------------------------------------------------------------------------------------------
# which layers


def _first_batch(split: VerifiedSplit) -> LabeledBatch:
    return next(iter(split.batches()))


@dataclass
class _Layers:
    """What one probing forward pass found: the influence layers, the probe's input layer, the classes."""

    tracked: list[TrackedLayer]
    num_classes: int
    probe: Optional[tuple[str, nn.Module]]
    probe_problem: str = ""

    @property
    def head(self) -> Optional[TrackedLayer]:
        """The tracked layer whose output is the logits (closed-form gradients, refittable), if any."""
        return next((layer for layer in reversed(self.tracked) if layer.closed_form), None)


def _select_layers(model: nn.Module, split: VerifiedSplit, config: RepairConfig, forward_fn: ForwardFn) -> _Layers:
    """Run one verified batch with hooks on every supported layer; find the head, the layers before it,
    and the first layer of the classifier MLP (whose input the probe reads)."""
    try:
        candidates = find_target_modules(model, "all")
        chosen = candidates if config.influence_modules is None else find_target_modules(model, config.influence_modules)
    except ValueError as err:
        raise ValueError(
            f"No layer to compute per-sample gradients for: {err} Set influence_modules to nn.Linear, Conv1D or "
            f"nn.Conv2d layers of the model."
        ) from err
    batch = _first_batch(split)
    with LayerCapture({name: module for name, (module, _) in candidates.items()}, track_grad=False, strict=False) as capture:
        with torch.no_grad():
            logits = forward_fn(model, batch.inputs)
        order = [name for name in capture.order if name not in capture.repeated]
        if capture.repeated:
            logger.warning("Not tracking layers that run more than once per forward pass (shared weights): %s",
                           sorted(capture.repeated))
        heads = [name for name in order if capture.outputs[name] is logits]
        out_dims = {name: capture.outputs[name].shape[-1] for name in order}
        flat_input = {name: capture.inputs[name].dim() == 2 for name in order}
    if logits.dim() != 2:
        raise ValueError(
            f"The model returns logits of shape {tuple(logits.shape)}; identification scores sequence classifiers "
            f"with (batch, num_classes) logits. Pass a forward_fn that returns them."
        )
    num_classes = logits.shape[-1]

    head = heads[-1] if heads else None
    if head is None:
        # e.g. GPT-2: the score layer runs on every token and the logits are pooled afterwards.
        matching = [name for name in order if out_dims[name] == num_classes]
        head = matching[-1] if matching else None
    if config.influence_modules is None:
        if head is None:
            raise ValueError(
                f"Found no layer that produces the {num_classes} logits among {order[-5:]} (the last layers that ran); "
                f"set influence_modules to the classification head's name."
            )
        if head not in heads:
            logger.warning(
                "The output of %r is not the logits themselves (they are pooled or transformed afterwards), so its "
                "per-sample gradients come from autograd instead of the closed form.", head
            )
        position = order.index(head)
        names = order[max(0, position - config.influence_depth + 1) : position + 1]
    else:
        unused = [name for name in chosen if name not in order]
        if unused:
            logger.warning("These influence_modules never ran in a forward pass and are ignored: %s", unused)
        names = [name for name in order if name in chosen]
        if not names:
            raise ValueError(f"None of influence_modules={config.influence_modules!r} ran in the model's forward pass.")
    tracked = [
        TrackedLayer(name=name, module=candidates[name][0], adapter=candidates[name][1], closed_form=name in heads)
        for name in names
    ]
    logger.info(
        "Influence layers: %s", ", ".join(f"{layer.name} ({'closed form' if layer.closed_form else 'autograd'})" for layer in tracked)
    )

    # The probe reads the input of the classifier MLP: walk back from the head while layers see one row per sample.
    probe, problem = None, ""
    if config.probe_module is not None:
        if config.probe_module not in flat_input:
            raise ValueError(
                f"probe_module={config.probe_module!r} is not a supported layer that ran in the forward pass; "
                f"the last ones were {order[-5:]}."
            )
        if not flat_input[config.probe_module]:
            raise ValueError(f"probe_module={config.probe_module!r} sees more than one row per sample; pick a layer "
                             f"whose input is (batch, features).")
        probe = config.probe_module
    elif head is not None and flat_input[head]:
        position = order.index(head)
        while position > 0 and flat_input[order[position - 1]]:
            position -= 1
        probe = order[position]
    else:
        problem = "no classification layer with one input row per sample"
    if probe is not None:
        logger.info("Probe features: the input of %s", probe)
    return _Layers(tracked=tracked, num_classes=num_classes,
                   probe=(probe, candidates[probe][0]) if probe is not None else None, probe_problem=problem)


# ----------------------------------------------------------------------------------------------
# the verified pass


class _VerifiedPass:
    """One pass over the verified split: influence statistics, and the features of the refit and the probe."""

    def __init__(self, model: nn.Module, layers: _Layers, config: RepairConfig, forward_fn: ForwardFn) -> None:
        self.model = model
        self.layers = layers.tracked
        self.num_classes = layers.num_classes
        self.config = config
        self.forward_fn = forward_fn
        generator = torch.Generator().manual_seed(config.repair_seed)
        self.influence = InfluenceModel(layers.tracked, layers.num_classes, config.preconditioner, generator=generator)
        self.head = layers.head
        self.probe_layer = layers.probe
        self.refit: Optional[HeadRefit] = None
        self.probe: Optional[LinearProbe] = None
        self.blind_classes: list[int] = []
        self.num_verified = 0
        self.verified_accuracy = math.nan

    def modules(self) -> dict[str, nn.Module]:
        """Every layer whose input is captured: the influence layers and the probe's input layer."""
        modules = {layer.name: layer.module for layer in self.layers}
        if self.probe_layer is not None:
            modules.setdefault(*self.probe_layer)
        return modules

    def run(self, split: VerifiedSplit, refit: bool) -> "_VerifiedPass":
        """Accumulate the influence statistics and fit the probe (and, if asked, the head refit)."""
        influence = self.influence
        head_rows, probe_rows, labels, folds, predictions = [], [], [], [], []
        progress = tqdm(total=split.num_local_samples(), desc="hf_repair: verified statistics", unit="sample",
                        disable=self.config.repair_disable_tqdm or not is_main_process())
        with LayerCapture(self.modules(), track_grad=influence.needs_backward) as capture:
            for batch in split.batches():
                capture.clear()
                with torch.set_grad_enabled(influence.needs_backward):
                    logits = self.forward_fn(self.model, batch.inputs)
                influence.accumulate(capture, logits, batch.labels)
                labels.append(batch.labels.to(logits.device))
                folds.append(torch.full_like(labels[-1], batch.fold))
                predictions.append(logits.detach().argmax(-1))
                if refit:  # the head's output is the (batch, C) logits, so its input has one row per sample
                    rows = self.head.input_rows(capture.inputs[self.head.name], len(batch.labels), torch.float64)
                    head_rows.append(rows[:, 0])
                if self.probe_layer is not None:
                    probe_rows.append(capture.inputs[self.probe_layer[0]].double())
                progress.update(len(batch.labels))
        progress.close()
        self.blind_classes = influence.finalize(self.config.damping)
        self.num_verified = int(influence.class_counts.sum())
        if self.blind_classes:
            logger.warning(
                "The verified split has no sample of classes %s; the influence score is blind to harm done to them, "
                "and the refit and the probe never predict them. Verify a few samples of each.",
                _class_names(self.model, self.blind_classes),
            )
        all_labels = gather_uneven(torch.cat(labels)).cpu()
        all_folds = gather_uneven(torch.cat(folds)).cpu()
        self.verified_accuracy = float((gather_uneven(torch.cat(predictions)).cpu() == all_labels).double().mean())
        if self.probe_layer is not None:  # the probe also estimates the noise rate and suggests labels: always fit
            features = gather_uneven(torch.cat(probe_rows)).cpu()
            self.probe = fit_probe(features, all_labels, all_folds, self.num_classes)
            logger.info("Probe on the input of %s: L2 %.0e, held-out accuracy %.4f.",
                        self.probe_layer[0], self.probe.l2, self.probe.heldout_accuracy)
        if refit:  # only when a score needs it: its k-fold fits cost time
            features = gather_uneven(torch.cat(head_rows)).cpu()
            self.refit = refit_head(features, all_labels, all_folds, self.head.head_weight().cpu())
            logger.info("Head refit on the verified split: prox %.0e, held-out accuracy %.4f (trained model %.4f).",
                        self.refit.prox, self.refit.heldout_accuracy, self.verified_accuracy)
        return self


def _class_names(model: nn.Module, classes: list[int]) -> str:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return ", ".join(f"{c} ({id2label[c]})" if c in id2label else str(c) for c in classes)


def _projected_copy(model: nn.Module, verified: Any, config: RepairConfig, forward_fn: ForwardFn,
                    collate_fn: Optional[CollateFn]) -> nn.Module:
    projected = copy.deepcopy(model)
    result = project(projected, dataclasses.replace(config, method="projection"), verified, forward_fn=forward_fn,
                     collate_fn=collate_fn)
    logger.info("Projection reference: %s", "adopted" if result.adopted else "not adopted (equals the trained model)")
    return projected.eval()


# ----------------------------------------------------------------------------------------------
# the training pass


def _score_training_set(
    model: nn.Module,
    projected: Optional[nn.Module],
    dataset: datasets.Dataset,
    scorer: _VerifiedPass,
    config: RepairConfig,
    forward_fn: ForwardFn,
    collate_fn: Optional[CollateFn],
    input_names: Optional[set[str]],
    device: torch.device,
) -> np.ndarray:
    """(N, len(_FIELDS)) per-sample values in dataset order, identical on every process."""
    rank, world = process_info()
    indices = np.arange(len(dataset), dtype=np.int64)[rank::world]
    influence = scorer.influence
    aggregate = _AGGREGATIONS[config.influence_aggregation]
    weights = influence.class_counts / influence.class_counts.sum()
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
            out = torch.full((n, len(_FIELDS)), math.nan, dtype=torch.float64)
            out[:, _FIELDS.index("index")] = torch.as_tensor(indices[offset : offset + n], dtype=torch.float64)
            out[:, _FIELDS.index("influence")] = aggregate(per_class, weights, scorer.blind_classes)
            out[:, _FIELDS.index("influence_mean")] = _aggregate_mean(per_class, weights, scorer.blind_classes)
            _put(out, "loss", "prediction", logits.detach().double().log_softmax(-1).cpu(), given)
            if scorer.refit is not None:
                head_rows = scorer.head.input_rows(capture.inputs[scorer.head.name], n, torch.float64)
                _put(out, "refit", "refit_prediction", scorer.refit.log_probs(head_rows[:, 0].cpu()), given)
            if scorer.probe is not None:
                probe_log_probs = scorer.probe.log_probs(capture.inputs[scorer.probe_layer[0]].cpu())
                _put(out, "probe", "probe_prediction", probe_log_probs, given)
            if projected is not None:
                with torch.no_grad():
                    projected_log_probs = forward_fn(projected, inputs).double().log_softmax(-1).cpu()
                _put(out, "projection", "projection_prediction", projected_log_probs, given)
            rows.append(out)
            offset += n
            progress.update(n)
    progress.close()
    local = torch.cat(rows) if rows else torch.zeros(0, len(_FIELDS), dtype=torch.float64)
    gathered = gather_uneven(local.to(device)).cpu().numpy()
    return gathered[np.argsort(gathered[:, 0], kind="stable")]


def _put(out: torch.Tensor, score: str, prediction: str, log_probs: torch.Tensor, given: torch.Tensor) -> None:
    """Write a reference's log-likelihood of the given label and its predicted label into the batch's rows."""
    out[:, _FIELDS.index(score)] = log_probs.gather(1, given[:, None])[:, 0]
    out[:, _FIELDS.index(prediction)] = log_probs.argmax(-1).double()


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


# ----------------------------------------------------------------------------------------------
# result


def _build_result(values: np.ndarray, labels: np.ndarray, dataset: datasets.Dataset, scorer: _VerifiedPass,
                  config: RepairConfig, score_name: str, components: list[str], timings: dict[str, float]
                  ) -> IdentificationResult:
    column = {name: values[:, i] for i, name in enumerate(_FIELDS)}
    available = {"influence": column["influence"], "loss": column["loss"]}
    if scorer.refit is not None:
        available["refit"] = column["refit"]
    if scorer.probe is not None:
        available["probe"] = column["probe"]
    if not np.isnan(column["projection"]).all():
        available["projection"] = column["projection"]
    n = len(labels)
    if score_name == "combined":
        score = np.mean([average_ranks(available[name]) / n for name in components], axis=0)
    else:
        score = available[score_name]

    if scorer.probe is not None:
        suggested = column["probe_prediction"]
    elif scorer.refit is not None:
        suggested = column["refit_prediction"]
    elif "projection" in available:
        suggested = column["projection_prediction"]
    else:
        suggested = column["prediction"]
    suggested = suggested.astype(np.int64)
    estimates = _noise_rate_estimates(column, labels, scorer)
    noise_source = "probe_disagreement" if "probe_disagreement" in estimates else "negative_influence"
    noise_rate = estimates[noise_source]
    flagged, threshold = flag_lowest(score, config, noise_rate)

    table: dict[str, Any] = {
        "index": np.arange(n, dtype=np.int64),
        "score": score.astype(np.float64),
        "given_label": labels,
        "suggested_label": suggested,
        "flagged": flagged,
    }
    corrupted = None
    if "is_corrupted" in dataset.column_names:
        corrupted = column_array(dataset, "is_corrupted").astype(bool)
        table["is_corrupted"] = corrupted
    for name, value in available.items():
        table[name] = value.astype(np.float64)

    summary: dict[str, Any] = {
        "num_samples": n,
        "num_flagged": int(flagged.sum()),
        "flag_rule": config.flag_rule,
        "threshold": threshold,
        "score": score_name,
        "estimated_noise_rate": noise_rate,
        "noise_rate_source": noise_source,
        "noise_rate_estimates": estimates,
        "blind_classes": list(scorer.blind_classes),
        "num_verified": scorer.num_verified,
        "influence_layers": [layer.name for layer in scorer.layers],
        "closed_form": [layer.name for layer in scorer.layers if layer.closed_form],
        "preconditioner": {name: ("exact" if stats.exact else "kfac") if config.preconditioner != "identity" else "identity"
                           for name, stats in scorer.influence.stats.items()},
        "damping": config.damping,
        "trained_verified_accuracy": scorer.verified_accuracy,
        **timings,
        "samples_per_second": n / timings["identify_time_s"],
        "train_pass_samples_per_second": n / timings["train_pass_s"],
    }
    if scorer.probe is not None:
        summary["probe_layer"] = scorer.probe_layer[0]
        summary["probe_l2"] = scorer.probe.l2
        summary["probe_heldout_accuracy"] = scorer.probe.heldout_accuracy
    if scorer.refit is not None:
        summary["refit_prox"] = scorer.refit.prox
        summary["refit_heldout_accuracy"] = scorer.refit.heldout_accuracy
    if corrupted is not None:
        hits = int((flagged & corrupted).sum())
        summary["precision"] = hits / int(flagged.sum()) if flagged.any() else 0.0
        summary["recall"] = hits / int(corrupted.sum()) if corrupted.any() else 0.0
        summary["auroc"] = auroc(score, corrupted)
        summary["auroc_by_score"] = {name: auroc(value, corrupted) for name, value in available.items()}
        summary["suggested_label_accuracy_on_corrupted"] = (
            float((suggested[corrupted] == column_array(dataset, "clean_labels")[corrupted]).mean())
            if "clean_labels" in dataset.column_names and corrupted.any() else math.nan
        )
    flagged_indices = np.flatnonzero(flagged).astype(np.int64)
    logger.info("Flagged %d of %d training samples (%s).", len(flagged_indices), n, config.flag_rule)
    return IdentificationResult(table=datasets.Dataset.from_dict(table), summary=summary, flagged_indices=flagged_indices)


def _noise_rate_estimates(column: dict[str, np.ndarray], labels: np.ndarray, scorer: _VerifiedPass) -> dict[str, float]:
    """Estimates of the share of wrong training labels.

    - negative_influence: the share of samples whose influence on the mean verified loss is negative.
    - probe_disagreement / refit_disagreement: the share whose given label differs from that reference's
      prediction, corrected for its own held-out error e on the verified split (assuming its errors spread
      evenly over the other classes): rate = (d - e) / (1 - e - e / (C - 1)).
    """
    estimates = {"negative_influence": float(np.mean(column["influence_mean"] < 0))}
    for name, reference in (("probe", scorer.probe), ("refit", scorer.refit)):
        if reference is None:
            continue
        disagreement = float(np.mean(column[f"{name}_prediction"] != labels))
        error = 1.0 - reference.heldout_accuracy
        denominator = 1.0 - error - error / max(scorer.num_classes - 1, 1)
        rate = (disagreement - error) / denominator if denominator > 0 else disagreement
        estimates[f"{name}_disagreement"] = float(min(max(rate, 0.0), 1.0))
    return estimates
