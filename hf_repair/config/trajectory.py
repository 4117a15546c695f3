"""Arguments of method "auto": which points of the training trajectory are scored, kept and chosen among."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TRAJECTORY_EVAL_STRATEGIES = ("epoch", "steps")
FRESH_OBJECTIVES = ("auto", "cross_entropy", "contrastive")
CONTRASTIVE_FEATURES = ("auto", "head_inputs", "token_mean")
AUTO_CANDIDATES = ("best", "average", "soup", "fresh", "head_refit", "projection", "erase", "retrain", "forward",
                   "reweight")
# on request: 'forward' measured, never chosen; 'reweight' measured on text only (BENCHMARKS.md)
DEFAULT_AUTO_CANDIDATES = tuple(name for name in AUTO_CANDIDATES if name not in ("forward", "reweight"))


@dataclass
class TrajectoryArguments:
    """How `RepairCallback` records the trajectory, and which candidates method "auto" weighs against the final weights."""

    _argument_group_name = "auto (choosing among the training trajectory)"

    trajectory_eval_strategy: str = field(
        default="epoch",
        metadata={
            "help": "method='auto' with RepairCallback: score the model on the verified samples (one forward pass "
            "each, eval mode) at the end of every epoch ('epoch') or every trajectory_eval_steps steps ('steps'). "
            "Match the Trainer's save_strategy to repair offline from the same checkpoints.",
            "choices": list(TRAJECTORY_EVAL_STRATEGIES),
        },
    )
    trajectory_eval_steps: Optional[int] = field(
        default=None, metadata={"help": "trajectory_eval_strategy='steps': score every this many optimizer steps."}
    )
    trajectory_keep: int = field(
        default=5,
        metadata={
            "help": "How many of the best trajectory points (by verified accuracy) weight averaging and the greedy "
            "soup draw on. RepairCallback keeps the weights of the points still among the best on some fold's "
            "complement in CPU memory: at most (num_folds + 1) x trajectory_keep + 1 copies of the model, usually "
            "about trajectory_keep + 1."
        },
    )
    auto_candidates: list[str] = field(
        default_factory=lambda: list(DEFAULT_AUTO_CANDIDATES),
        metadata={
            "help": "What method='auto' weighs against the final weights: 'best' (the best trajectory point), "
            "'average' (uniform average of the best trajectory_keep points), 'soup' (greedy soup), 'fresh' (the "
            "weights training started from, fine-tuned on the verified samples alone, fresh_epochs of budget; needs "
            "the initial weights, which RepairCallback keeps); then, on top of the best trajectory one (and of 'fresh' "
            "where it beats that), 'head_refit', 'projection' and 'erase' (identify the harmful training samples with "
            "that model and fine-tune without them, retention_epochs of budget; only when the training data is "
            "given), 'retrain' (identify them the same way, then fine-tune the weights training *started* from "
            "on the rest, retrain_epochs of budget; needs the training data and the initial weights, which "
            "RepairCallback keeps), 'forward' (the weights training started from fine-tuned on every training sample, "
            "each label learnt through the noise transition that model's identification estimates, retrain_epochs of "
            "budget; not by default: measured, auto never chose it and on text it cost 2-2.8 times auto's epochs, "
            "BENCHMARKS.md), 'reweight' (as 'retrain', on every training sample, its loss weighed by the probability "
            "that its label is right under that model's prediction and estimated noise transition; on request: "
            "measured on text only, level with retrain and erase, BENCHMARKS.md). Chosen by accuracy on held-out "
            "verified folds; where 'fresh' itself leads, its best erase, retrain, forward or reweight is taken if it "
            "passes the gate (the folds under-rate them: their refit identifies with 'fresh' on every verified sample, "
            "BENCHMARKS.md).",
        },
    )
    retrain_epochs: Optional[float] = field(
        default=None,
        metadata={
            "help": "The 'retrain' refinement's budget in epochs of the training set (and 'forward''s and "
            "'reweight''s); its fine-tune stops early at its lowest held-out verified loss, with the learning rate "
            "and batch size of erase and retention. None: 10 where the fine-tune mixes its batches "
            "(retrain_mixup_alpha), 3 where it does not: mixed batches keep a longer fine-tune from fitting the corruption identification missed, while "
            "unmixed ones fit it (measured, BENCHMARKS.md)."
        },
    )
    retrain_small_loss_trim: float = field(
        default=0.0,
        metadata={
            "help": "small_loss_trim of the 'retrain' refinement's fine-tune. Measured (BENCHMARKS.md): 0.1 with "
            "retrain_epochs=10 raised the retrain on a ViT fine-tune from 41 to 51 percent of the gap to a clean one, but "
            "auto's choice gained within noise at twice the cost (one run per fold), fell from 37 to 28 percent at two, and one "
            "text retrain lost 12 points, so 0."
        },
    )
    retrain_mixup_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "mixup_alpha of the 'retrain' refinement's fine-tune (0: off). None: 1 where the model "
                  "takes a floating-point input (pixel values, features), 0 where it takes token ids only or where "
                  "retrain_small_loss_trim is set. Measured on a ViT fine-tune with retrain_epochs 10: auto closed 67 "
                  "percent of the gap to a clean one instead of 37. Set, it mixes a text model's input embeddings; on a "
                  "MiniLM fine-tune the retrain alone gained 0.4 points, within noise, at 3 times the epochs, so it "
                  "is not the default there (BENCHMARKS.md)."},
    )
    runs_per_fold: int = field(
        default=2,
        metadata={
            "help": "How many fine-tunes (repair seeds repair_seed, repair_seed + 1000, ...) 'fresh', 'erase', "
            "'retrain', 'forward' and 'reweight' run on each verified fold's complement. The fold's held-out "
            "predictions come from the average of its runs, and the weights auto ends with average runs too (erase "
            "and retrain of a trajectory base: all num_folds x runs_per_fold fold runs; fresh: runs_per_fold more on "
            "every verified sample), so the folds judge an average as the one adopted, not a single run, which "
            "lands lower (BENCHMARKS.md). "
            "Costs runs_per_fold times those fine-tunes and holds one more float64 copy of the trainable weights "
            "while a fold runs. A LoRA adapter's runs are not averaged, so it runs one. Measured (BENCHMARKS.md): 2 "
            "lifted a ViT fine-tune's auto from 23 to 37 percent of the gap to a clean one, above early stopping on "
            "every seed, and left text within noise, at about twice auto's cost on vision and two to three times on "
            "text; 1 (the earlier default) for a cheaper auto."
        },
    )
    fresh_epochs: float = field(
        default=20.0,
        metadata={
            "help": "The 'fresh' procedure's budget in passes over the verified samples it trains on; its fine-tune "
            "stops early at its lowest held-out verified loss, with the learning rate and batch size of erase and "
            "retention."
        },
    )
    fresh_learning_rate_scales: list[float] = field(
        default_factory=lambda: [1.0, 0.5],
        metadata={
            "help": "Multiples of the erase learning rate the 'fresh' fine-tune runs at on each fold's complement; the "
            "run with the lowest loss on its inner held-out fold is kept (the first on ties). A learning rate that "
            "suits training on the whole training set can be too high for a few hundred samples (BENCHMARKS.md); "
            "each scale costs num_folds fine-tunes."
        },
    )
    fresh_objective: str = field(
        default="auto",
        metadata={
            "help": "How 'fresh' fine-tunes the initial weights on the verified samples: 'cross_entropy' (fresh_epochs "
            "at each of fresh_learning_rate_scales, early-stopped on an inner fold) or 'contrastive' (SetFit's "
            "recipe: the body trained on pairs of verified samples, the cosine similarity of their features "
            "(fresh_contrastive_features) regressed on whether they share a label, fresh_contrastive_iterations at "
            "fresh_contrastive_learning_rate; then the head refitted on those samples). 'auto': 'contrastive' for "
            "a model that reads token ids and has a head to refit, fully fine-tuned or a LoRA adapter; 'cross_entropy' "
            "otherwise (images: the contrastive fresh stayed below the final weights on a ViT). "
            "Measured on a MiniLM text classifier with 300 verified reviews, BENCHMARKS.md. Each contrastive "
            "fine-tune trains on 2 x fresh_contrastive_iterations pairs per verified sample.",
            "choices": list(FRESH_OBJECTIVES),
        },
    )
    fresh_contrastive_iterations: int = field(
        default=10,
        metadata={"help": "A contrastive fresh (fresh_objective): pairs per verified sample, two per iteration "
                  "(one partner of its label, one of another; SetFit's num_iterations, whose default is 20). "
                  "Measured on MiniLM (BENCHMARKS.md): 10 at a learning rate of 5e-5 reached SetFit's 20 at 2e-5 in "
                  "half the steps, 5 fell short."},
    )
    fresh_contrastive_features: str = field(
        default="auto",
        metadata={
            "help": "A contrastive fresh (fresh_objective): which features the pair loss compares. 'head_inputs': the "
            "classification head's inputs; 'token_mean': a transformers model's backbone (model.base_model) token "
            "states averaged over the attention mask, what a sentence encoder was pretrained to give; 'auto': "
            "'token_mean' where the model reads input_ids, else 'head_inputs'. Measured on MiniLM (BENCHMARKS.md): "
            "the head's inputs (the pooled CLS state) reached 71 percent on test, the token mean 75.",
            "choices": list(CONTRASTIVE_FEATURES),
        },
    )
    fresh_contrastive_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "A contrastive fresh (fresh_objective): the peak learning rate (AdamW, 10 percent "
                  "warm-up, then linear decay). None: 5e-5 for a full fine-tune, 5e-4 where the trainable weights "
                  "are LoRA factors, which learn at about ten times a full fine-tune's rate (measured on MiniLM with "
                  "a rank-8 adapter, the pair fine-tune and head refit alone, BENCHMARKS.md: on seed 0 5e-5 reached "
                  "64 percent on test, 5e-4 76 and 2e-3 73; on seeds 0-2 5e-4 closed 93-105 percent of the gap)."},
    )

    auto_significance_level: Optional[float] = field(
        default=0.2,
        metadata={
            "help": "Level of the one-sided significance_test that auto's choice must pass against the final weights "
            "on the pooled held-out predictions of every verified sample (None: significance_level, which the "
            "other methods' gates use). Measured in BENCHMARKS.md (benchmarks/gate_level.py): on 15 fine-tuning "
            "runs every candidate auto chose was better than the final weights on test, and a gate at 0.05 refused "
            "5 of them (gains of 0.5 to 7.5 points), one at 0.2 two."
        },
    )

    def validate(self) -> None:
        self.auto_candidates = list(self.auto_candidates)
        if self.trajectory_eval_strategy not in TRAJECTORY_EVAL_STRATEGIES:
            raise ValueError(f"trajectory_eval_strategy must be one of {list(TRAJECTORY_EVAL_STRATEGIES)}, "
                             f"got {self.trajectory_eval_strategy!r}.")
        if self.trajectory_eval_strategy == "steps" and (self.trajectory_eval_steps or 0) < 1:
            raise ValueError("trajectory_eval_strategy='steps' needs trajectory_eval_steps >= 1.")
        if self.trajectory_keep < 1:
            raise ValueError(f"trajectory_keep must be at least 1, got {self.trajectory_keep}.")
        if self.retrain_epochs is not None and not self.retrain_epochs > 0:
            raise ValueError(f"retrain_epochs must be positive (or None: chosen by retrain_mixup_alpha), got "
                             f"{self.retrain_epochs}.")
        if not 0.0 <= self.retrain_small_loss_trim < 0.5:
            raise ValueError(f"retrain_small_loss_trim must be in [0, 0.5), got {self.retrain_small_loss_trim}.")
        if self.retrain_mixup_alpha is not None and not self.retrain_mixup_alpha >= 0:
            raise ValueError(f"retrain_mixup_alpha must be >= 0 (0 turns mixup off; None: by the model's inputs), got "
                             f"{self.retrain_mixup_alpha}.")
        if (self.retrain_mixup_alpha or 0.0) > 0 and self.retrain_small_loss_trim > 0:
            raise ValueError("retrain_mixup_alpha and retrain_small_loss_trim both guard the retrain against the "
                             "corruption identification missed; use one of them.")
        if isinstance(self.runs_per_fold, bool) or not isinstance(self.runs_per_fold, int) or self.runs_per_fold < 1:
            raise ValueError(f"runs_per_fold must be a whole number of at least 1, got {self.runs_per_fold!r}.")
        if not self.fresh_epochs > 0:
            raise ValueError(f"fresh_epochs must be positive, got {self.fresh_epochs}.")
        self.fresh_learning_rate_scales = [float(scale) for scale in self.fresh_learning_rate_scales]
        if not self.fresh_learning_rate_scales or not all(scale > 0 for scale in self.fresh_learning_rate_scales):
            raise ValueError(f"fresh_learning_rate_scales must be a non-empty list of positive multiples of the "
                             f"learning rate, got {self.fresh_learning_rate_scales}.")
        if self.fresh_objective not in FRESH_OBJECTIVES:
            raise ValueError(f"fresh_objective must be one of {list(FRESH_OBJECTIVES)}, got {self.fresh_objective!r}.")
        if (isinstance(self.fresh_contrastive_iterations, bool) or not isinstance(self.fresh_contrastive_iterations, int)
                or self.fresh_contrastive_iterations < 1):
            raise ValueError(f"fresh_contrastive_iterations must be a whole number of at least 1, got "
                             f"{self.fresh_contrastive_iterations!r}.")
        if self.fresh_contrastive_features not in CONTRASTIVE_FEATURES:
            raise ValueError(f"fresh_contrastive_features must be one of {list(CONTRASTIVE_FEATURES)}, got "
                             f"{self.fresh_contrastive_features!r}.")
        if self.fresh_contrastive_learning_rate is not None and not self.fresh_contrastive_learning_rate > 0:
            raise ValueError(f"fresh_contrastive_learning_rate must be positive (or None: by the trainable weights), "
                             f"got {self.fresh_contrastive_learning_rate}.")
        if self.auto_significance_level is not None and not 0.0 < self.auto_significance_level < 1.0:
            raise ValueError(f"auto_significance_level must be in (0, 1) or None, got {self.auto_significance_level}.")
        unknown = [c for c in self.auto_candidates if c not in AUTO_CANDIDATES]
        if unknown:
            raise ValueError(f"Unknown auto_candidates {unknown}; choose from {list(AUTO_CANDIDATES)}.")
