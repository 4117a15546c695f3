"""`Repairer`: the entry point for repairing a model that is already trained."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from torch import nn

from .config.repair_config import RepairConfig
from .data.verified import CollateFn, VerifiedSplit, model_input_names
from .evaluation.prediction import ForwardFn, MetricFn, default_forward
from .identification.identify import IdentificationResult, identify_harmful
from .projection.search import ProjectionOutcome, ProjectionRepair
from .results import LayerRecord, RepairResult
from .retention.repair import FINETUNE_METHODS, repair_with_finetuning
from .modeling.sharding import weight_access_for
from .modeling.targets import find_target_modules
from .modeling.weights import WeightSnapshot

logger = logging.getLogger(__name__)


class Repairer:
    """Repairs a trained model (a `transformers` model or any `nn.Module`) with a verified split.

    Args:
        model: the trained model; repaired in place.
        config: what to repair and how; `RepairConfig()` by default.
        compute_metrics: a `Trainer`-style `compute_metrics(EvalPrediction) -> dict`, or an
            `evaluate` metric object, for choosing the repair by something other than accuracy.
        forward_fn: `forward_fn(model, inputs) -> logits` for models not called as `model(**inputs)`.
        collate_fn: batches verified samples (e.g. `DataCollatorWithPadding(tokenizer)` for text).

    Example:
        >>> repairer = Repairer(model, RepairConfig(target_modules="all-linear", seed=0))
        >>> result = repairer.repair(verified)  # datasets.Dataset with model inputs and "labels"
        >>> result.metrics["accuracy_before"], result.metrics["accuracy_after"]
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[RepairConfig] = None,
        *,
        compute_metrics: Optional[MetricFn | Any] = None,
        forward_fn: Optional[ForwardFn] = None,
        collate_fn: Optional[CollateFn] = None,
    ) -> None:
        self.model = model
        self.config = config or RepairConfig()
        self.compute_metrics = compute_metrics
        self.forward_fn = forward_fn or default_forward
        self.collate_fn = collate_fn

    def find_targets(self) -> dict[str, tuple[nn.Module, Any]]:
        """The layers this config repairs; raises `ValueError` listing candidates if none match."""
        return find_target_modules(self.model, self.config.target_modules, self.config.exclude_modules)

    def verified_split(self, verified: Any) -> VerifiedSplit:
        """The verified samples as this process's folds of batches, on the model's device; checks the columns."""
        return VerifiedSplit(
            verified,
            num_folds=self.config.num_folds,
            batch_size=self.config.batch_size,
            seed=self.config.repair_seed,
            label_column=self.config.label_column,
            collate_fn=self.collate_fn,
            input_names=None if self.forward_fn is not default_forward else model_input_names(self.model),
            device=next(self.model.parameters()).device,
        )

    def identify(self, train_dataset: Any, verified: Any) -> IdentificationResult:
        """Score, rank and flag the training samples that hurt the model; the model is not changed.

        See `hf_repair.identification.identify_harmful`; `config.score` and `config.flag_rule` choose how.
        """
        _check_materialized(self.model)
        return identify_harmful(
            self.model, train_dataset, verified, self.config, forward_fn=self.forward_fn, collate_fn=self.collate_fn
        )

    def repair(self, verified: Any, train_dataset: Any = None, *,
               identification: Optional[IdentificationResult] = None) -> RepairResult:
        """Repair the model in place with `config.method` and return what was done; on any error the model is restored.

        Args:
            verified: the verified split (`datasets.Dataset` with model inputs and `config.label_column`).
            train_dataset: the data the model was trained on; the fine-tuning methods ("retention", "erase",
                "projection+retention", "projection+erase") need it, "projection" ignores it.
            identification: a `Repairer.identify(train_dataset, verified)` result to reuse instead of identifying again.
        """
        if self.config.method in FINETUNE_METHODS:
            _check_materialized(self.model)
            return repair_with_finetuning(self, verified, train_dataset, identification)
        if train_dataset is not None:
            logger.info("method='projection' uses the verified split only; train_dataset is not used.")
        return self._repair_projection(verified)

    def _repair_projection(self, verified: Any) -> RepairResult:
        start = time.perf_counter()
        config = self.config
        _check_materialized(self.model)
        targets = self.find_targets()
        split = self.verified_split(verified)

        snapshot = WeightSnapshot({name: module for name, (module, _) in targets.items()}, weight_access_for(self.model))
        was_training = self.model.training
        self.model.eval()
        try:
            outcome = ProjectionRepair(self.model, config, targets, self.forward_fn, self.compute_metrics).run(
                split, snapshot
            )
            result = self._result(outcome, targets, snapshot, time.perf_counter() - start)
        except BaseException:
            snapshot.restore()
            raise
        finally:
            self.model.train(was_training)
        logger.info("%s", result.summary())
        return result

    def _result(self, outcome: ProjectionOutcome, targets: dict[str, tuple[nn.Module, Any]],
                snapshot: WeightSnapshot, seconds: float) -> RepairResult:
        config = self.config
        metric = config.metric_for_selection
        chosen = outcome.chosen_scores
        metrics: dict[str, Any] = {
            "accuracy_before": outcome.baseline_scores["accuracy"],
            "accuracy_after": chosen["accuracy"],
            "alpha": outcome.alpha,
            "adopted": outcome.adopted,
            "num_verified": outcome.num_samples,
            "num_layers": sum(len(m) for m in outcome.groups.values()),
            "num_clean_spaces": len(outcome.groups),
            "repair_time_s": seconds,
        }
        if metric != "accuracy":
            metrics[f"{metric}_before"] = outcome.baseline_scores[metric]
            metrics[f"{metric}_after"] = chosen[metric]

        layers = {
            name: LayerRecord(
                name=name,
                kind=targets[name][1].kind,
                group=leader,
                input_dim=outcome.spaces[leader].dim,
                rank=outcome.spaces[leader].rank(),
                relative_change=snapshot.relative_change(name),
                weight_shape=tuple(snapshot.original(name).shape),
                alpha=_layer_alpha(outcome, leader),
            )
            for leader, members in outcome.groups.items()
            for name in members
        }
        return RepairResult(
            config=config,
            metrics=metrics,
            layers=layers,
            spaces=outcome.spaces,
            selection=outcome.alpha_scores,
            _snapshot=snapshot,
        )


def _layer_alpha(outcome: ProjectionOutcome, leader: str) -> Optional[float]:
    """The alpha applied to a clean space's layers; None where the layers were left as trained."""
    if not outcome.adopted:
        return None
    return outcome.layer_alphas[leader] if outcome.layer_alphas is not None else outcome.alpha


def _check_materialized(model: nn.Module) -> None:
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"The model has {len(meta)} parameters on the meta device (e.g. {meta[:3]}); load real weights "
            f"first (from_pretrained without device_map='meta', or model.to_empty(...) plus load_state_dict)."
        )
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters to repair.")
