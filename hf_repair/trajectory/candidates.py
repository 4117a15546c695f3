"""The selection procedures of method "auto": from the verified samples they may select on, to weights.

A procedure sees a set of verified samples -- all but one fold while it is being judged, all of them
when it is finally run -- and builds weights from the trajectory with them alone:

- `final`: the final weights (selects nothing);
- `best`: the point with the best accuracy on those samples (early stopping);
- `average`: the uniform average of the `keep` best points on those samples (weight averaging);
- `soup`: a greedy soup (Wortsman et al., 2022): the `keep` best points, best first, each added to the
  average while the average's accuracy on those samples does not drop;
- `fresh`: the weights training started from, fine-tuned on those samples alone (`fresh.py`): where the noise did
  more harm than the training set's size did good, this beats every point of the trajectory;
- `<base>+head_refit`: the base procedure, then its head refitted on those samples (its strength chosen
  by inner folds of them);
- `<base>+projection`: the base procedure, then the projection built, chosen and gated on those samples;
- `<base>+erase`: the base procedure, then the harmful training samples identified with it (its probe
  trained on those samples) and a fine-tune on those samples and the unflagged training data, kept at
  its lowest loss on an inner fold of them without a gate of its own: the outer folds judge it;
- `<base>+retrain`: the harmful samples identified as for erase, then the weights training started from
  fine-tuned on those samples and the unflagged training data (`retrain_epochs` of budget, same early
  stop). When the model barely memorised its noise, what separates it from a clean-trained one is what the
  noise did while it learnt, which no edit of the final weights undoes; learning again without the flagged
  samples does (measured in BENCHMARKS.md, fine-tuning regime). Where the inputs are floating point (images,
  not token ids), its batches are mixed with themselves (mixup) for a longer budget, so that it does not learn
  the corrupted samples identification missed (a text model's input embeddings can be mixed too, on request:
  measured within noise);
- `<base>+forward`: the weights training started from fine-tuned on those samples and *every* training sample,
  each given label learnt through the noise transition P(given | true) that the base's identification
  estimates (forward correction, Patrini et al. 2017; same budget and early stop as retrain). It drops nothing,
  so it does not depend on telling which labels are wrong, only on how often each class's are: where
  identification is weak (a text model's, BENCHMARKS.md) that is the better bet;
- `<base>+reweight`: as retrain (same start, budget, mixup and early stop), but on *every* training sample, its
  loss weighed by the probability that its given label is right: the identifying model's prediction (its probe's)
  weighed against the noise transition it estimates (`identification/posterior.py`). Where identification is
  weak, a hard cut drops many clean samples and keeps many corrupted ones; a weight keeps each at the strength
  the identification believes it (measured on text: level with retrain and erase, BENCHMARKS.md).

A chosen erase, retrain, forward or reweight of `fresh`, refitted on every verified sample (below), flags by (and
learns through) the noise rate and transition that fresh's fold models calibrate on the folds they did not learn
(`heldout_noise.py`), not fresh's own identification's, whose probe reads features fitted to the verified samples
and over-estimates the noise. The fold runs the folds judge keep their fold fresh's own identification: calibrated
too, they made the folds prefer `fresh` itself over a refit that did better on test (measured, BENCHMARKS.md).

On a trajectory base the weights erase and retrain end with are the uniform average of their fold runs, the ones
the folds judged, not one more fine-tune on every sample: that saves a fine-tune, and averaging fine-tunes from one
start lands above a single one (measured, BENCHMARKS.md). On `fresh` they are refitted instead: identified by
`fresh` on every verified sample and averaged over `num_folds` runs on all of them. There the identifying model
itself learnt the verified samples, so a fold's, which learnt two thirds of them, identifies worse (AUROC 0.02-0.06
lower on text, where identification is the limit: measured, BENCHMARKS.md). Only the best fine-tuning refinement
judged so far on a trajectory base keeps its fold runs (a float64 running sum of their trainable weights on CPU),
so at most two such sums exist.
With `runs_per_fold` > 1 (2 by default) each fold runs that many fine-tunes (own repair seeds) and predicts with
their average, so what the folds judge is an average like the one adopted: one run lands below the average of three
(measured, BENCHMARKS.md), and judging single runs hid gains the average has.
An average of fold runs must reach, on every verified sample, the pooled held-out accuracy its runs showed: each
sample was learnt by all runs but one, so an average below that has lost what the runs learnt (they sit in
different basins: measured on a text retrain, BENCHMARKS.md). Then one more fine-tune on every verified sample
replaces it.
A LoRA adapter's runs are not averaged: measured, neither the mean of their factors A and B nor the rank-r factors
of the mean of their updates B A ended above one more fine-tune on every verified sample, not even with the folds
judging averages of two runs (BENCHMARKS.md); fresh, erase and retrain end with that fine-tune there, one run per fold.

`CandidateBuilder.heldout_predictions(procedure, fold)` runs a procedure without fold `fold` and
predicts that fold; `apply(procedure)` leaves the model with its weights on every verified sample.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from ..config import RepairConfig
from ..data import CollateFn, VerifiedSplit, column_array
from ..evaluation import ForwardFn, eval_mode, predict, predict_by_fold
from ..head_refit import HeadInputs, find_head, fit_head, read_head_inputs, refit_and_predict, write_head
from ..identification import IdentificationResult, identify_harmful, label_confidence
from ..identification.influence import TrackedLayer
from ..modeling.lora import has_lora_factors
from ..projection.pipeline import ProjectionResult, project
from ..retention import repair_with_finetuning
from .averaging import FoldRunSum, average_weights
from .checkpoints import StateDict, load_weights
from .fresh import FreshBuilder
from .heldout_noise import FoldCalibration, calibrate_on_fold_models, with_noise_rate
from .points import Trajectory
from .verified_folds import has_floating_inputs, inner_finetune_config, verified_outside

logger = logging.getLogger(__name__)

BASE_PROCEDURES = ("final", "best", "average", "soup", "fresh")
REFINEMENTS = ("head_refit", "projection", "erase", "retrain", "forward", "reweight")
# run on each fold's complement as a datasets.Dataset
DATASET_PROCEDURES = ("fresh", "projection", "erase", "retrain", "forward", "reweight")
NEEDS_INITIAL_WEIGHTS = ("fresh", "retrain", "forward", "reweight")
# they end with the average of their judged fold runs
FINETUNING_REFINEMENTS = ("erase", "retrain", "forward", "reweight")

Points = tuple[int, ...]  # trajectory points whose uniform weight average a procedure builds


@dataclass(frozen=True)
class Fresh:
    """The weights of base procedure "fresh" selected without verified fold `fold` (None: on every sample)."""

    fold: int | None


Base = Points | Fresh  # the weights a base procedure builds


class CandidateBuilder:
    """Builds every procedure's weights in the model (loading trajectory states in place) and predicts with them.

    Predictions and head inputs are cached per set of points, so a soup or refit shared by several folds
    costs one forward pass.
    """

    def __init__(self, model: nn.Module, trajectory: Trajectory, split: VerifiedSplit, verified: Any,
                 config: RepairConfig, forward_fn: ForwardFn, collate_fn: CollateFn | None = None,
                 train_dataset: Any = None) -> None:
        self.model = model
        self.train_dataset = train_dataset
        self.trajectory = trajectory
        self.split = split
        self.verified = verified
        self.config = config
        self.forward_fn = forward_fn
        self.collate_fn = collate_fn
        self._predictions: dict[Base, torch.Tensor] = {}
        self._head_inputs: dict[Base, tuple[HeadInputs, torch.Tensor]] = {}
        self._head: TrackedLayer | None = None
        # identifications by (base, held-out fold): erase and retrain on the same base share one
        self._identifications: dict[tuple[Base, int | None], IdentificationResult] = {}
        self._fold_runs: dict[str, FoldRunSum] = {}  # fine-tuning refinements' fold runs (`judged` keeps the best)
        self._kept: tuple[str, float] | None = None  # the fine-tuning refinement kept, and its held-out accuracy
        self._heldout: dict[str, float] = {}  # every judged procedure's pooled held-out accuracy
        self.average_checks: dict[str, dict[str, Any]] = {}  # fold-run averages checked against their held-out accuracy
        self.fresh_calibration: FoldCalibration | None = None  # what a refit of fresh's refinements flags by (`_calibrate_on_fresh`)
        self.averages_fold_runs = not has_lora_factors(model)
        self.runs_per_fold = config.runs_per_fold if self.averages_fold_runs else 1
        self._retrain_alpha: float | None = None  # retrain_mixup_alpha resolved once (`retrain_mixup_alpha`)
        self.fresh = FreshBuilder(model, trajectory, split, verified, config, forward_fn, collate_fn, self._find_head,
                                  self.runs_per_fold)

    @property
    def fresh_identification(self) -> IdentificationResult | None:
        """What a refinement of fresh refitted on every verified sample flagged by (None where none was)."""
        return self._identifications.get((Fresh(None), None))

    # ------------------------------------------------------------------------------------------
    # weights and predictions of a base

    def weights(self, base: Base) -> StateDict:
        """A base's weights: "fresh" ones, or the uniform average of trajectory points (floating tensors; others
        from the latest point)."""
        if isinstance(base, Fresh):
            return self.fresh.weights(base.fold)
        states = [self.trajectory.weights(i) for i in base]
        return states[0] if len(states) == 1 else average_weights(states, latest=int(np.argmax(base)))

    def load(self, base: Base) -> None:
        load_weights(self.model, self.weights(base))

    def predictions(self, base: Base) -> torch.Tensor:
        """Every verified sample's predicted class under a base's weights (no forward pass for one point)."""
        if not isinstance(base, Fresh) and len(base) == 1:
            return self.trajectory.points[base[0]].predictions
        if base not in self._predictions:
            self.load(base)
            with eval_mode(self.model):
                logits, _, _ = predict_by_fold(self.model, self.split, self.forward_fn)
            self._predictions[base] = logits.argmax(-1).cpu()
        return self._predictions[base]

    def head_inputs(self, base: Base) -> tuple[HeadInputs, torch.Tensor]:
        """The head's inputs on every verified sample under a base's weights, and that head's weight."""
        if base not in self._head_inputs:
            self.load(base)
            head = self._find_head()
            inputs = read_head_inputs(self.model, head, self.split, self.forward_fn)
            if not torch.equal(inputs.labels, self.trajectory.labels):
                raise RuntimeError("The head inputs were read in another sample order than the trajectory's.")
            self._head_inputs[base] = (inputs, head.head_weight().cpu())
        return self._head_inputs[base]

    def _find_head(self) -> TrackedLayer:
        if self._head is None:
            self._head = find_head(self.model, self.split, self.config, self.forward_fn)
        return self._head

    # ------------------------------------------------------------------------------------------
    # procedures

    def base(self, procedure: str, fold: int | None) -> Base:
        """The weights a base procedure builds, selected on the samples outside `fold` (all for None)."""
        trajectory = self.trajectory
        if procedure == "fresh":
            return Fresh(fold)
        if procedure == "final":
            return (trajectory.final_index,)
        if procedure == "best":
            return (trajectory.top(fold)[0],)
        if procedure == "average":
            return tuple(sorted(trajectory.top(fold)))
        if procedure == "soup":
            return self._greedy_soup(fold)
        raise ValueError(f"Unknown base procedure {procedure!r}; choose one of {list(BASE_PROCEDURES)}.")

    def _greedy_soup(self, fold: int | None) -> Points:
        mask = self.trajectory.training_mask(fold)
        ranked = self.trajectory.top(fold)
        soup: Points = (ranked[0],)
        score = self._accuracy(soup, mask)
        for point in ranked[1:]:
            candidate = tuple(sorted((*soup, point)))
            candidate_score = self._accuracy(candidate, mask)
            if candidate_score >= score:
                soup, score = candidate, candidate_score
        return soup

    def _accuracy(self, points: Points, mask: torch.Tensor) -> float:
        return float(self.trajectory.correct(self.predictions(points))[mask].double().mean())

    def heldout_predictions(self, procedure: str, fold: int) -> torch.Tensor:
        """The predictions on fold `fold` of the procedure run on the other folds (fold order of `predict_by_fold`)."""
        name, _, refinement = procedure.partition("+")
        base = self.base(name, fold)
        held = self.trajectory.folds == fold
        if not refinement:
            return self.predictions(base)[held]
        if refinement == "head_refit":
            inputs, anchor = self.head_inputs(base)
            logits = refit_and_predict(inputs.features, inputs.labels, ~held, anchor, self.config.num_folds,
                                       self.config.repair_seed)
            return logits.argmax(-1)
        if refinement in DATASET_PROCEDURES:
            self._refine_outside(procedure, base, fold)
            with eval_mode(self.model):
                logits, _ = predict(self.model, self.split.batches(fold), self.forward_fn)
            return logits.argmax(-1).cpu()
        raise ValueError(f"Unknown refinement {refinement!r}; choose one of {list(REFINEMENTS)}.")

    def _refine_outside(self, procedure: str, base: Base, fold: int) -> None:
        """Leave the model with a refinement of `base` run on the verified samples outside `fold`: for a fine-tuning
        refinement whose runs are averaged, the average of its `runs_per_fold` runs, each also added to the
        procedure's sum of fold runs (what `apply` ends with on a trajectory base)."""
        refinement = procedure.partition("+")[2]
        if refinement not in FINETUNING_REFINEMENTS or not self.averages_fold_runs:
            self.load(base)
            self._refine(refinement, self._outside(fold), (base, fold))
            return
        fold_runs = self._refine_runs(procedure, base, fold, self.runs_per_fold)
        if fold_runs.count > 1:
            load_weights(self.model, fold_runs.average(self.trajectory.shared))

    def _refine_runs(self, procedure: str, base: Base, fold: int | None, count: int) -> FoldRunSum:
        """Run a fine-tuning refinement of `base` `count` times (own repair seeds) on the verified samples outside
        `fold`; the sum of the runs. A fold's runs on a trajectory base are also added to the procedure's kept fold
        runs (what `apply` ends with there); a fresh base is refitted on every sample instead."""
        refinement, outside = procedure.partition("+")[2], self._outside(fold)
        runs = FoldRunSum()
        for run in range(count):
            self.load(base)
            self._refine(refinement, outside, (base, fold), run)
            state = self.trajectory.cpu_state(self.model.state_dict(), frozen=set())
            runs.add(state)
            if fold is not None and not isinstance(base, Fresh):
                self._fold_runs.setdefault(procedure, FoldRunSum()).add(state)
        return runs

    def judged(self, procedure: str, accuracy: float) -> None:
        """A procedure's pooled held-out accuracy is known: keep the fold runs of the best fine-tuning refinement
        judged so far (the first on ties, as the candidate is chosen), drop the others'."""
        self._heldout[procedure] = accuracy
        if procedure not in self._fold_runs:
            return
        if self._kept is not None and accuracy <= self._kept[1]:
            del self._fold_runs[procedure]
            return
        if self._kept is not None:
            del self._fold_runs[self._kept[0]]
        self._kept = (procedure, accuracy)

    def apply(self, procedure: str) -> tuple[Points, ProjectionResult | None]:
        """Leave the model with the procedure's weights on every verified sample (for erase and retrain on a trajectory
        base, the average of their judged fold runs; on "fresh", of `num_folds` runs on every verified sample);
        returns the trajectory points its base averages on them (none for "fresh")."""
        name, _, refinement = procedure.partition("+")
        base = self.base(name, None)
        points = () if isinstance(base, Fresh) else base
        averaged = refinement in FINETUNING_REFINEMENTS and self.averages_fold_runs
        if averaged and isinstance(base, Fresh):  # refitted: fresh's fold runs identified with two thirds of the samples
            runs = self._refine_runs(procedure, base, None, self.trajectory.num_folds)
            load_weights(self.model, runs.average(self.trajectory.shared))
            return points, None
        if averaged:
            runs = self._fold_runs.get(procedure)
            if runs is None or runs.count != self.trajectory.num_folds * self.runs_per_fold:
                raise RuntimeError(f"{procedure} ends with the average of its fold runs, and they were not kept: "
                                   "judge it on every fold first (the best fine-tuning refinement judged is kept).")
            load_weights(self.model, runs.average(self.trajectory.shared))
            if self._average_holds(procedure):
                return points, None
        self.load(base)
        projection = None
        if refinement == "head_refit":
            inputs, anchor = self.head_inputs(base)
            refit = fit_head(inputs.features, inputs.labels, anchor, self.config.num_folds, self.config.repair_seed)
            write_head(self._head, refit.weight)
        elif refinement:
            projection = self._refine(refinement, self.verified, (base, None))
        return points, projection

    def _average_holds(self, procedure: str) -> bool:
        """Whether the loaded average of a procedure's fold runs is at least as accurate on every verified sample as
        the runs were held out (recorded in `average_checks`)."""
        heldout = self._heldout.get(procedure)
        if heldout is None:  # not judged (applied directly): nothing to check against
            return True
        with eval_mode(self.model):
            logits, _, _ = predict_by_fold(self.model, self.split, self.forward_fn)
        accuracy = float(self.trajectory.correct(logits.argmax(-1).cpu()).double().mean())
        holds = accuracy >= heldout
        self.average_checks[procedure] = {"verified_accuracy": accuracy, "heldout_accuracy": heldout, "kept": holds}
        if not holds:
            logger.info("method='auto': the average of %s's fold runs is %.4f accurate on the verified samples they "
                        "learnt, below their %.4f held out: fine-tuning once more on every verified sample instead.",
                        procedure, accuracy, heldout)
        return holds

    def _refine(self, refinement: str, verified: datasets.Dataset, key: tuple[Base, int | None],
                run: int = 0) -> ProjectionResult | None:
        """Run a projection, erase or retrain refinement on the loaded weights (base `key`) with `verified` alone;
        the fine-tune of run `run` (the identification is the same for every run)."""
        if refinement == "projection":
            return project(self.model, dataclasses.replace(self.config, method="projection"), verified,
                           forward_fn=self.forward_fn, collate_fn=self.collate_fn)
        if key not in self._identifications:
            refit_on_fresh = isinstance(key[0], Fresh) and key[1] is None
            if refit_on_fresh:
                self._calibrate_on_fresh()
                self.load(key[0])
            config = inner_finetune_config(self.config)
            identification = identify_harmful(self.model, self.train_dataset, verified, config,
                                              forward_fn=self.forward_fn, collate_fn=self.collate_fn,
                                              keep_reference_log_probs="reweight" in self.config.auto_candidates)
            self._identifications[key] = (with_noise_rate(identification, self.fresh_calibration, self.config)
                                          if refit_on_fresh else identification)
        identification, transition, weights = self._identifications[key], None, None
        if refinement == "forward":
            identification, transition = through_the_noise(identification)
        if refinement == "reweight":
            identification, weights = weighed_by_confidence(identification)
        erase = inner_finetune_config(self.config, run)
        if refinement in ("retrain", "forward", "reweight"):
            load_weights(self.model, self.trajectory.initial_weights())
            retrain = refinement != "forward"
            alpha = self.retrain_mixup_alpha() if retrain else 0.0
            erase = dataclasses.replace(erase, retention_epochs=retrain_budget(self.config, alpha),
                                        small_loss_trim=self.config.retrain_small_loss_trim if retrain else 0.0,
                                        mixup_alpha=alpha)
        repair_with_finetuning(self.model, erase, verified, self.train_dataset, identification,
                               forward_fn=self.forward_fn, collate_fn=self.collate_fn, noise_transition=transition,
                               training_weights=weights)
        return None

    def _calibrate_on_fresh(self) -> None:
        """The noise rate and transition of a refinement of `fresh` refitted on every verified sample, calibrated once
        by fresh's fold models on the folds they did not learn (`heldout_noise.py`): fresh's own probe reads features
        fitted to the verified samples and over-estimates the noise."""
        if self.fresh_calibration is None:
            self.fresh_calibration = calibrate_on_fold_models(self.model, self.fresh.weights, self.split,
                                                              self.train_dataset, self.config, self.forward_fn,
                                                              self.collate_fn)

    def retrain_mixup_alpha(self) -> float:
        """`retrain_mixup_alpha`, or where None: 1 for a model with a floating-point input (pixel values, features),
        0 for token ids (mixing their embeddings measured within noise on text) or when the retrain trims its batches."""
        if self._retrain_alpha is None:
            if self.config.retrain_mixup_alpha is not None:
                self._retrain_alpha = self.config.retrain_mixup_alpha
            elif self.config.retrain_small_loss_trim > 0:
                self._retrain_alpha = 0.0
            else:
                self._retrain_alpha = 1.0 if has_floating_inputs(self.split) else 0.0
        return self._retrain_alpha

    def check_procedure(self, name: str) -> str | None:
        """Why a base procedure or refinement cannot run on this model or verified split (None: it can)."""
        if name in DATASET_PROCEDURES and not isinstance(self.verified, datasets.Dataset):
            return f"the {name} of each fold's complement needs the verified split as a datasets.Dataset"
        if name in FINETUNING_REFINEMENTS and self.train_dataset is None:
            return f"{name} fine-tunes on the training data, and none was given (Repairer.repair(train_dataset=...))"
        if name in NEEDS_INITIAL_WEIGHTS and self.trajectory.initial is None:
            return (f"{name} starts again from the weights training started from, which were not given "
                    "(RepairCallback keeps them; offline, Repairer.repair(initial_weights=...))")
        if name == "head_refit" or (name == "fresh" and self.config.fresh_objective == "contrastive"):
            try:
                self._find_head()  # a contrastive fresh refits it too
            except ValueError as err:
                return str(err)
        return None

    def _outside(self, fold: int | None) -> datasets.Dataset:
        """The verified samples a procedure judged on fold `fold` selects on (all of them for None)."""
        return verified_outside(self.verified, self.split, fold, self.config.repair_seed)


def retrain_budget(config: RepairConfig, mixup_alpha: float) -> float:
    """`retrain_epochs`, or where None: 10 for a fine-tune on mixed batches, 3 for one on the rows themselves
    (measured: mixup keeps a longer fine-tune from fitting the corruption identification missed)."""
    if config.retrain_epochs is not None:
        return config.retrain_epochs
    return 10.0 if mixup_alpha > 0 else 3.0


def through_the_noise(identification: IdentificationResult) -> tuple[IdentificationResult, torch.Tensor]:
    """What "forward" fine-tunes with: the identification with nothing flagged, and the noise transition it
    estimated, which every training label is then learnt through."""
    transition = torch.tensor(identification.summary["noise_transition"], dtype=torch.float32)
    return dataclasses.replace(identification, flagged_indices=np.zeros(0, dtype=np.int64)), transition


def weighed_by_confidence(identification: IdentificationResult) -> tuple[IdentificationResult, np.ndarray]:
    """What "reweight" fine-tunes with: the identification with nothing flagged, and each training sample's
    probability that its given label is right under the identifying reference and the noise transition it estimated."""
    if identification.reference_log_probs is None:
        raise ValueError("reweight weighs each training label by the identifying reference's class probabilities; "
                         "identify with keep_reference_log_probs=True.")
    confidence = label_confidence(identification.reference_log_probs, column_array(identification.table, "given_label"),
                                  identification.summary["noise_transition"])
    return dataclasses.replace(identification, flagged_indices=np.zeros(0, dtype=np.int64)), confidence
