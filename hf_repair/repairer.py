"""`Repairer`: the entry point for repairing a model that is already trained; it dispatches to the methods."""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from .config import FINETUNE_METHODS, HEAD_REFIT_METHODS, RepairConfig
from .data import CollateFn, VerifiedSplit
from .evaluation import ForwardFn, MetricFn, default_forward, split_verified
from .head_refit.repair import repair_head
from .identification import IdentificationResult, identify_harmful
from .modeling.lora import FrozenBase, peft_layers
from .modeling.targets import find_target_modules
from .projection.pipeline import check_materialized, project
from .results import RepairResult
from .retention import repair_with_finetuning
from .trajectory.checkpoints import Checkpoints, StateDict
from .trajectory.points import Trajectory
from .trajectory.repair import repair_from_trajectory

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
        config: RepairConfig | None = None,
        *,
        compute_metrics: MetricFn | Any | None = None,
        forward_fn: ForwardFn | None = None,
        collate_fn: CollateFn | None = None,
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
        return split_verified(self.model, verified, self.config, self.forward_fn, self.collate_fn)

    def identify(self, train_dataset: Any, verified: Any, *, keep_reference_log_probs: bool = False) -> IdentificationResult:
        """Score, rank and flag the training samples that hurt the model; the model is not changed.

        See `hf_repair.identification.identify.identify_harmful`; `config.score` and `config.flag_rule` choose how.
        `keep_reference_log_probs`: also keep every class's log-probability under the reference that suggests labels,
        from which `hf_repair.identification.label_posterior` gives each sample's probability of every true class.
        """
        check_materialized(self.model)
        return identify_harmful(self.model, train_dataset, verified, self.config, forward_fn=self.forward_fn,
                                collate_fn=self.collate_fn, keep_reference_log_probs=keep_reference_log_probs)

    def repair(self, verified: Any, train_dataset: Any = None, *,
               identification: IdentificationResult | None = None,
               checkpoints: Checkpoints | Trajectory | None = None,
               initial_weights: str | os.PathLike | StateDict | None = None) -> RepairResult:
        """Repair the model in place with `config.method` and return what was done; on any error the model is restored.

        Args:
            verified: the verified split (`datasets.Dataset` with model inputs and `config.label_column`).
            train_dataset: the data the model was trained on; the fine-tuning methods ("retention", "erase",
                "projection+retention", "projection+erase") need it, "auto" weighs an erase refinement with it,
                the others ignore it.
            identification: a `Repairer.identify(train_dataset, verified)` result to reuse instead of identifying again.
            checkpoints: method "auto" only: the training trajectory to choose from -- a `Trainer` output_dir with
                `checkpoint-*` folders, a list of checkpoint folders or state dicts in training order, or the
                `Trajectory` that `RepairCallback` records. The model itself is taken as the final weights.
            initial_weights: method "auto" only: the weights training started from (a checkpoint folder or a state
                dict; e.g. the pretrained model with its new head, saved before `trainer.train()`), for the
                "fresh" procedure and the "retrain", "forward" and "reweight" refinements. `RepairCallback` keeps
                them itself.
        """
        for name, value in (("checkpoints", checkpoints), ("initial_weights", initial_weights)):
            if value is not None and self.config.method != "auto":
                raise ValueError(f"{name} are used by method='auto' only, not method={self.config.method!r}.")
        if train_dataset is not None and self.config.method not in (*FINETUNE_METHODS, "auto"):
            logger.info("method=%r uses the verified split only; train_dataset is not used.", self.config.method)
        peft_layers(self.model)  # an unsupported peft adapter fails here, before anything changes
        frozen = FrozenBase.of(self.model)
        if self.config.method in FINETUNE_METHODS:
            result = repair_with_finetuning(
                self.model, self.config, verified, train_dataset, identification, forward_fn=self.forward_fn,
                collate_fn=self.collate_fn, compute_metrics=self.compute_metrics,
            )
        elif self.config.method == "auto":
            result = repair_from_trajectory(self.model, self.config, verified, checkpoints, train_dataset=train_dataset,
                                            initial_weights=initial_weights, forward_fn=self.forward_fn,
                                            collate_fn=self.collate_fn)
        elif self.config.method in HEAD_REFIT_METHODS:
            result = repair_head(self.model, self.config, verified, forward_fn=self.forward_fn,
                                 collate_fn=self.collate_fn, compute_metrics=self.compute_metrics)
        else:
            projection = project(self.model, self.config, verified, forward_fn=self.forward_fn,
                                 collate_fn=self.collate_fn, compute_metrics=self.compute_metrics)
            result = RepairResult.from_projection(self.config, projection)
        if frozen is not None:
            _check_adapter_saveable(result, frozen)
        logger.info("%s", result.summary())
        return result


def _check_adapter_saveable(result: RepairResult, frozen: FrozenBase) -> None:
    """Record in `metrics["peft_adapter_saveable"]` whether the adapter alone holds the repair; warn if not."""
    changed = frozen.changed()
    result.metrics["peft_adapter_saveable"] = not changed
    if changed:
        logger.warning(
            "The %s repair changed %d weights of the frozen base model that the peft adapter does not save (e.g. %s), "
            "so model.save_pretrained() would write an adapter without them. Save the merged model instead: "
            "model.merge_and_unload().save_pretrained(dir) (hf-repair does so itself).",
            result.config.method, len(changed), changed[:3],
        )
