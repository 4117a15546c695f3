"""`RepairCallback`: repair the model with a verified split when `Trainer` finishes training.

A `TrainerCallback` receives no trainer or accelerator, only what `Trainer` hands every event:
`args`, `state`, `model`, `train_dataloader`, ... The callback takes what the repair needs from
there:

- the model: the `model` keyword (the model `Trainer` trains; FSDP-wrapped under FSDP, with sharded
  parameters under FSDP2 / ZeRO-3, which `Repairer` writes back through `hf_repair.modeling.sharding`);
- the data collator: `train_dataloader.collate_fn`, i.e. the collator `Trainer` batches the training
  data with (including its column removal), unless one is passed to the callback;
- the distributed state: Accelerate's `PartialState`, the process-wide singleton `Trainer`'s
  `Accelerator` already set up, read by `hf_repair.utils.distributed`;
- `args.output_dir` for `repair_results.json` and the report (`repair_report/index.html`),
  `args.disable_tqdm` for progress bars.

Ordering. `Trainer` loads the best checkpoint (`load_best_model_at_end`) right before
`on_train_end`, so the repair runs on the best model. Reporting integrations (TensorBoard, W&B,
MLflow, ...) close their writers or runs in their own `on_train_end`, and `Trainer` appends user
callbacks after them; `RepairCallback.attach(trainer)` therefore registers the callback ahead of the
integrations and logs through `trainer.log`, so `repair/*` metrics reach every `report_to` target
and `trainer.state.log_history`. Without `attach` (`Trainer(callbacks=[...])`), the metrics still
reach `log_history` and `repair_results.json`, and `on_train_begin` refuses to start training when
`report_to` names an integration that would miss them.

Method "auto". The callback also records the training trajectory: at the end of every epoch (or every
`trajectory_eval_steps` steps) it scores the model on the verified samples (one forward pass, eval mode,
sharded over processes and gathered, so every process holds the same numbers) and keeps the weights of
the points a selection procedure can still use on CPU (`hf_repair.trajectory.points` bounds them), and,
for the fresh procedure and the retrain and forward refinements, the weights training starts from. At train end
`Repairer.repair(verified, checkpoints=trajectory)` chooses among the final weights, the best point, weight
averages, soups, a fresh fine-tune on the verified samples alone, and head refit / projection / erase /
retrain / forward on top, by nested held-out verified folds.

Outputs. The main process writes `repair_results.json` (the layout `hf-repair` writes too) and the
HTML report of `RepairResult.report` into `output_dir/repair_report/`, both replacing those of an
earlier run in the same `output_dir`. Writing the report is best effort: a failure is logged and
recorded in `repair_results.json`, and never fails training or touches the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch import nn
from transformers import DefaultFlowCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import FINETUNE_METHODS, RepairConfig
from ..data import CollateFn, check_label_range
from ..evaluation import ForwardFn, MetricFn
from ..modeling.sharding import weight_access_for
from ..repairer import Repairer
from ..results import RepairResult
from ..trajectory.candidates import FINETUNING_REFINEMENTS, NEEDS_INITIAL_WEIGHTS
from ..trajectory.points import Trajectory
from ..trajectory.recorder import TrajectoryRecorder
from ..utils.files import write_json

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

RESULTS_NAME = "repair_results.json"
REPORT_DIR = "repair_report"


class RepairCallback(TrainerCallback):
    """Repairs the trained model with a verified split at the end of `Trainer.train()`.

    Args:
        config: what to repair and how; `None` for `RepairConfig(method="auto")`: the callback sees the
            training trajectory, and choosing among it measured best on fine-tuned pretrained models
            (BENCHMARKS.md, "Fine-tuning a pretrained model").
        verified_dataset: the verified (hand-checked) samples, a `datasets.Dataset` preprocessed like
            the training data (model inputs plus `config.label_column`).
        collate_fn: batches verified samples; by default the collator `Trainer` uses for training.
        compute_metrics: a `Trainer`-style `compute_metrics` or an `evaluate` metric, for choosing the
            repair by `config.metric_for_selection` instead of accuracy.
        forward_fn: `forward_fn(model, inputs) -> logits` for models not called as `model(**inputs)`.
        write_report: write the HTML report of the repair into `output_dir/repair_report/`.
        test_dataset: labelled held-out data, preprocessed like `verified_dataset`, that the report scores
            before and after the repair (per class, confusion matrices). The main process scores it
            alone, so it needs unsharded weights (not FSDP or ZeRO-3).
        train_dataset: for the fine-tuning methods (and the erase, retrain and forward refinements of "auto"): the
            training data to identify harmful samples in and fine-tune on. By default the dataset the `Trainer`
            trained on (after its unused-column removal), so it batches with its collator.

    After training, `callback.result` holds the `RepairResult` (`result.undo()` restores the trained
    weights), or `callback.error` the exception that stopped the repair; the model is then exactly as
    trained. A later `trainer.save_model()` saves the repaired weights. With method "auto",
    `callback.trajectory` holds the recorded evaluation points (their weights released after the repair).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        >>> RepairCallback(RepairConfig(target_modules="all-linear"), verified).attach(trainer)
        >>> trainer.train()  # logs repair/accuracy_before, repair/accuracy_after, repair/alpha, ...
        >>> trainer.save_model()
    """

    def __init__(
        self,
        config: RepairConfig | None,
        verified_dataset: Any,
        *,
        collate_fn: CollateFn | None = None,
        compute_metrics: MetricFn | Any | None = None,
        forward_fn: ForwardFn | None = None,
        write_report: bool = True,
        test_dataset: Any | None = None,
        train_dataset: Any | None = None,
    ) -> None:
        if verified_dataset is None:
            raise ValueError("RepairCallback needs verified_dataset: the verified samples to repair the model with.")
        if test_dataset is not None and not write_report:
            raise ValueError("test_dataset is only scored for the report; drop it or set write_report=True.")
        self.config = config or RepairConfig(method="auto")
        self.verified_dataset = verified_dataset
        self.collate_fn = collate_fn
        self.compute_metrics = compute_metrics
        self.forward_fn = forward_fn
        self.write_report = write_report
        self.test_dataset = test_dataset
        self.train_dataset = train_dataset
        self.result: RepairResult | None = None
        self.error: Exception | None = None
        self.trajectory: Trajectory | None = None
        self._recorder: TrajectoryRecorder | None = None
        self._log: Callable[[dict[str, float]], None] | None = None
        self._trainer_collate_fn: CollateFn | None = None
        self._trainer_train_dataset: Any | None = None

    def attach(self, trainer: Trainer) -> RepairCallback:
        """Register with `trainer` ahead of its reporting integrations and log through `trainer.log`.

        `Trainer(callbacks=[...])` and `trainer.add_callback` place callbacks after TensorBoard, W&B,
        MLflow, ..., which close their writers in their own `on_train_end` before this callback's
        metrics exist. Here the callback goes right after `DefaultFlowCallback` instead.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)
        self._log = trainer.log
        return self

    # ----------------------------------------------------------------------------------------------
    # events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        """Check everything the repair will need now, not after hours of training."""
        if self._log is None and args.report_to:
            raise ValueError(
                f"RepairCallback was added through Trainer(callbacks=...) or add_callback, so it would run after the "
                f"report_to integrations {args.report_to}, which close their writers before the repair metrics exist. "
                f"Register it with `RepairCallback(...).attach(trainer)` instead."
            )
        self._trainer_collate_fn = getattr(train_dataloader, "collate_fn", None)
        self._trainer_train_dataset = getattr(train_dataloader, "dataset", None)
        repairer = self._repairer(model, args)
        self._check_fits(repairer)
        if self.config.method == "auto":
            self.trajectory = None
            self._recorder = TrajectoryRecorder(model, repairer.verified_split(self.verified_dataset),
                                                repairer.forward_fn, self.config.trajectory_keep)
            if self._restarts():
                self._recorder.record_initial()  # one more CPU copy of the trainable weights
        if self._uses_training_data():
            self._training_data()
        if self.test_dataset is not None:
            self._check_test_dataset(model)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._recorder is not None and self.config.trajectory_eval_strategy == "epoch":
            self._recorder.record(state.global_step, state.epoch)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if (self._recorder is not None and self.config.trajectory_eval_strategy == "steps"
                and state.global_step % self.config.trajectory_eval_steps == 0):
            self._recorder.record(state.global_step, state.epoch)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        self.result, self.error = None, None
        try:
            train_dataset = self._training_data() if self._uses_training_data() else None
            trajectory = self._final_trajectory(state)
            self.result = self._repairer(model, args).repair(self.verified_dataset, train_dataset=train_dataset,
                                                             checkpoints=trajectory)
        except Exception as err:  # training's own outputs stay intact; the Repairer restored the weights
            self.error = err
            logger.exception("hf_repair: the repair failed; the model is left exactly as trained.")
            if state.is_world_process_zero:
                write_json(os.path.join(args.output_dir, RESULTS_NAME),
                           repair_results(None, self.config, training_source(state), error=err))
            return
        finally:
            if self.trajectory is not None:
                self.trajectory.release_weights()

        logs = _repair_logs(self.result)
        if self._log is not None:
            self._log(logs)
        else:  # as Trainer.log records it
            entry = dict(logs, step=state.global_step)
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            state.log_history.append(entry)
        if state.is_world_process_zero:
            report, report_error = self._report(model, args) if self.write_report else (None, None)
            write_json(os.path.join(args.output_dir, RESULTS_NAME), repair_results(
                self.result, self.config, training_source(state), report=report, report_error=report_error,
            ))

    # ----------------------------------------------------------------------------------------------

    def _repairer(self, model: nn.Module | None, args: TrainingArguments) -> Repairer:
        if model is None:
            raise ValueError("RepairCallback got no model from the Trainer; it must be registered with a Trainer.")
        config = self.config
        if args.disable_tqdm and not config.repair_disable_tqdm:
            config = dataclasses.replace(config, repair_disable_tqdm=True)
        if self._uses_training_data():  # fine-tune as training did, unless told otherwise
            config = dataclasses.replace(
                config, retention_batch_size=config.retention_batch_size or args.per_device_train_batch_size,
                retention_learning_rate=config.retention_learning_rate or args.learning_rate)
        return Repairer(
            model,
            config,
            compute_metrics=self.compute_metrics,
            forward_fn=self.forward_fn,
            collate_fn=self.collate_fn or self._trainer_collate_fn,
        )

    def _final_trajectory(self, state: TrainerState) -> Trajectory | None:
        """method "auto": the recorded trajectory, with the model as it ends training marked final."""
        if self._recorder is None:
            return None
        recorder, self._recorder = self._recorder, None
        recorder.record_final(state.global_step, state.epoch)
        self.trajectory = recorder.trajectory
        return self.trajectory

    def _restarts(self) -> bool:
        """Whether "auto" weighs a procedure that starts again from the initial weights: "fresh", or "retrain",
        "forward" or "reweight" (which need the training data too)."""
        restarts = set(NEEDS_INITIAL_WEIGHTS) & set(self.config.auto_candidates)
        return "fresh" in restarts or (bool(restarts) and self._uses_training_data())

    def _uses_training_data(self) -> bool:
        """The fine-tuning methods need the training data; "auto" weighs its erase, retrain and forward refinements when
        it has some."""
        if self.config.method == "auto":
            dataset = self.train_dataset if self.train_dataset is not None else self._trainer_train_dataset
            fine_tunes = set(FINETUNING_REFINEMENTS) & set(self.config.auto_candidates)
            return bool(fine_tunes) and isinstance(dataset, datasets.Dataset)
        return self.config.method in FINETUNE_METHODS

    def _training_data(self) -> datasets.Dataset:
        """The training set a fine-tuning repair needs: the one given, else the one `Trainer` trained on."""
        dataset = self.train_dataset if self.train_dataset is not None else self._trainer_train_dataset
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(
                f"RepairCallback: method={self.config.method!r} fine-tunes on the training data, but "
                + ("the Trainer's training data is not a datasets.Dataset" if dataset is not None else "none was found")
                + "; pass RepairCallback(..., train_dataset=...) with the datasets.Dataset the model is trained on."
            )
        return dataset

    def _report(self, model: nn.Module, args: TrainingArguments) -> tuple[str | None, str | None]:
        """Write `output_dir/repair_report/`; on failure log it and return the reason instead of raising."""
        try:
            page = self.result.report(
                os.path.join(args.output_dir, REPORT_DIR), model=model, test_dataset=self.test_dataset,
                overwrite=True, forward_fn=self.forward_fn, collate_fn=self.collate_fn or self._trainer_collate_fn,
            )
        except Exception as err:  # the report is a view of the repair: never worth failing training over
            logger.exception("hf_repair: could not write the repair report; the repaired model is unaffected.")
            return None, f"{type(err).__name__}: {err}"
        return os.path.relpath(page, args.output_dir), None

    def _check_test_dataset(self, model: nn.Module) -> None:
        """The report scores test data in the main process alone, which sharded weights cannot do."""
        access = weight_access_for(model)
        if access.kind != "plain":
            raise ValueError(
                f"RepairCallback(test_dataset=...) scores the test data in the main process alone, which the "
                f"{access.kind}-sharded model cannot run; leave test_dataset out (trainer.evaluate scores test data "
                f"on all processes)."
            )
        column = self.config.label_column
        if column not in self.test_dataset.column_names:
            raise ValueError(
                f"RepairCallback: test_dataset has no label column {column!r} (columns: "
                f"{self.test_dataset.column_names}); preprocess it like the verified split."
            )

    def _check_fits(self, repairer: Repairer) -> None:
        """Target layers exist, and one verified batch goes through the collator and the model."""
        repairer.find_targets()  # raises ValueError listing the repairable layers
        split = repairer.verified_split(self.verified_dataset)
        model = repairer.model
        was_training = model.training
        model.eval()
        try:
            batch = next(split.batches(fold=0))
            with torch.no_grad():
                logits = repairer.forward_fn(model, batch.inputs)
        except Exception as err:
            raise ValueError(
                f"RepairCallback: the verified split does not fit the model ({type(err).__name__}: {err}). Give it "
                f"the model's input columns and {self.config.label_column!r}, preprocessed like the training data, "
                f"or pass a collate_fn / forward_fn."
            ) from err
        finally:
            model.train(was_training)
        check_label_range(split.labels_all, logits.shape[-1])


def _repair_logs(result: RepairResult) -> dict[str, Any]:
    m = result.metrics
    logs = {
        "repair/accuracy_before": float(m["accuracy_before"]),
        "repair/accuracy_after": float(m["accuracy_after"]),
        "repair/adopted": float(result.adopted),
        "repair/num_verified": float(m["num_verified"]),
        "repair/num_layers": float(m["num_layers"]),
        "repair/time_s": float(m["repair_time_s"]),
    }
    if m.get("alpha") is not None:  # None when the repair was not adopted
        logs["repair/alpha"] = float(m["alpha"])
    for key in ("gain", "p_value"):  # the significance gate of the adoption
        if m.get(key) is not None:
            logs[f"repair/{key}"] = float(m[key])
    if m.get("chosen") is not None:  # method "auto": the procedure the model ends with, and the runner-up it beat
        logs["repair/chosen"] = m["chosen"]
        logs["repair/heldout_accuracy_final"] = float(m["heldout_accuracy"]["final"])
        logs["repair/heldout_accuracy_candidate"] = float(m["heldout_accuracy"][m["candidate"]])
    for key in ("num_flagged", "steps"):  # the fine-tuning methods
        if m.get(key) is not None:
            logs[f"repair/{key}"] = float(m[key])
    metric = result.config.metric_for_selection
    if metric != "accuracy":
        logs[f"repair/{metric}_before"] = float(m[f"{metric}_before"])
        logs[f"repair/{metric}_after"] = float(m[f"{metric}_after"])
    return logs


def repair_results(
    result: RepairResult | None,
    config: RepairConfig,
    source: dict[str, Any],
    *,
    report: str | None = None,
    report_error: str | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """The content of `repair_results.json`, written alike by `RepairCallback` and `hf-repair`.

    `result.to_dict()` (config, metrics, layers, selection) or, when the repair failed, the config and
    the `error`; `source`: what was repaired (the training run, or the checkpoint and data files);
    `report`: the report's `index.html` relative to the file, or None with the reason in `report_error`.
    """
    payload = result.to_dict() if result is not None else {"config": config.to_dict()}
    if error is not None:
        payload["error"] = f"{type(error).__name__}: {error}"
    payload["source"] = source
    payload["report"] = report
    if report_error is not None:
        payload["report_error"] = report_error
    return payload


def training_source(state: TrainerState) -> dict[str, Any]:
    """Which model of the training run was repaired."""
    return {"global_step": state.global_step, "best_model_checkpoint": state.best_model_checkpoint}
