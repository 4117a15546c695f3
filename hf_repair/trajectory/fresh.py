"""Base procedure "fresh": the weights training started from, fine-tuned on the verified samples alone.

It sees no noisy label. Where the noise did more harm than the training set's size did good (a text model that
memorised its noise, BENCHMARKS.md), this beats every point of the trajectory, and the harmful samples its
refinements identify are judged by a model that never learnt them. Two objectives (`fresh_objective`):

- cross-entropy: `fresh_epochs` passes at each of `fresh_learning_rate_scales`, kept at the lowest loss on an inner
  fold of the samples;
- contrastive, the default for a text model (fully fine-tuned or a LoRA adapter): the body trained on pairs of the
  samples, regressed on whether they share a label (`retention/contrastive.py`), then the head refitted on them.

Like each fold's, its weights on every sample average `runs_per_fold` fine-tunes (a soup of fine-tunes from one
start): on a few hundred samples one fine-tune can land far from another (measured, BENCHMARKS.md), their average
less so. A LoRA adapter's are not averaged (`candidates.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit
from ..evaluation import ForwardFn, split_verified
from ..head_refit import fit_head, read_head_inputs, write_head
from ..identification.influence import TrackedLayer
from ..retention import RetentionRepair, finetune_learning_rate
from ..retention.contrastive import contrastive_finetune
from .averaging import FoldRunSum
from .checkpoints import StateDict, load_weights
from .points import Trajectory
from .verified_folds import has_floating_inputs, inner_finetune_config, verified_outside

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class FreshBuilder:
    """Fine-tunes the initial weights in the model on the verified samples outside each fold, and keeps the result
    (one CPU copy of the trainable weights per fold; the model is left with the last fine-tune)."""

    model: nn.Module
    trajectory: Trajectory
    split: VerifiedSplit
    verified: datasets.Dataset
    config: RepairConfig
    forward_fn: ForwardFn
    collate_fn: CollateFn | None
    find_head: Callable[[], TrackedLayer]
    runs_per_fold: int
    _weights: dict[int | None, StateDict] = field(default_factory=dict)  # by held-out fold (trainable, on CPU)
    _objective: str | None = None  # fresh_objective resolved once (`objective`)

    def weights(self, fold: int | None) -> StateDict:
        """The initial weights fine-tuned on the verified samples outside `fold` (all of them for None), the average
        of `runs_per_fold` runs."""
        if fold not in self._weights:
            outside = verified_outside(self.verified, self.split, fold, self.config.repair_seed)
            runs = FoldRunSum()  # one float64 copy however many runs
            for run in range(self.runs_per_fold):
                runs.add(self._finetune(outside, run))
            self._weights[fold] = runs.average(self.trajectory.shared)  # a run may omit a key it holds as shared
        kept = self._weights[fold]
        return {**self.trajectory.shared, **kept} if self.trajectory.shared else kept

    @property
    def resolved_objective(self) -> str | None:
        """The objective `fresh` was fine-tuned by (None where it was not built)."""
        return self._objective

    def objective(self) -> str:
        """`fresh_objective`, or where "auto": "contrastive" for a model that reads token ids only and has a head to
        refit, fully fine-tuned or a LoRA adapter (measured on text), "cross_entropy" for one with a floating-point
        input (measured below the final weights on a ViT) or no head."""
        if self._objective is None:
            objective = self.config.fresh_objective
            if objective == "auto":
                pairs = not has_floating_inputs(self.split) and self._has_head()
                objective = "contrastive" if pairs else "cross_entropy"
            self._objective = objective
        return self._objective

    def _has_head(self) -> bool:
        try:
            self.find_head()
        except ValueError:
            return False
        return True

    def _finetune(self, verified: datasets.Dataset, run: int) -> StateDict:
        """The initial weights fine-tuned on `verified` alone at each of `fresh_learning_rate_scales`; the run with
        the lowest loss on its inner held-out fold, as a CPU state (trainable weights). With
        a contrastive objective, `_contrastive`'s weights instead."""
        config = inner_finetune_config(self.config, run)
        if self.objective() == "contrastive":
            return self._contrastive(verified, config)
        learning_rate = finetune_learning_rate(config)
        split = split_verified(self.model, verified, config, self.forward_fn, self.collate_fn)
        best_loss, best_state = float("inf"), None
        for scale in self.config.fresh_learning_rate_scales:
            load_weights(self.model, self.trajectory.initial_weights())
            scaled = dataclasses.replace(config, retention_learning_rate=learning_rate * scale)
            result = RetentionRepair(self.model, scaled, forward_fn=self.forward_fn, collate_fn=self.collate_fn,
                                     compute_metrics=None).run_on_verified(verified, split, self.config.fresh_epochs)
            loss = result.scores_after["loss"]
            logger.info("method='auto': fresh at learning rate %.3g, inner held-out loss %.4f.",
                        scaled.retention_learning_rate, loss)
            if best_state is None or loss < best_loss:
                best_loss, best_state = loss, self.trajectory.cpu_state(self.model.state_dict(), frozen=set())
        return best_state

    def _contrastive(self, verified: datasets.Dataset, config: RepairConfig) -> StateDict:
        """The initial weights' body fine-tuned on pairs of `verified` samples, then the head refitted on them (its
        L2 strength by `num_folds`-fold cross-validation on them), as a CPU state (trainable weights)."""
        load_weights(self.model, self.trajectory.initial_weights())
        head = self.find_head()
        result = contrastive_finetune(self.model, head.module, verified, config, self.forward_fn, self.collate_fn)
        logger.info("method='auto': contrastive fresh, %d steps on %d pairs, final pair loss %.4f.", result.steps,
                    result.num_pairs, result.final_loss)
        inputs = read_head_inputs(self.model, head, split_verified(self.model, verified, config, self.forward_fn,
                                                                   self.collate_fn), self.forward_fn)
        refit = fit_head(inputs.features, inputs.labels, head.head_weight().cpu(), config.num_folds,
                         config.repair_seed)
        write_head(head, refit.weight)
        return self.trajectory.cpu_state(self.model.state_dict(), frozen=set())
