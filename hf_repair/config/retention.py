"""Arguments of the fine-tuning methods ("retention", "erase" and their "projection+" forms): the guarded fine-tune."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SEPARATIONS = ("belief", "agreement", "soft", "surgery")
RETENTION_PENALTIES = ("none", "l2", "fisher")


@dataclass
class RetentionArguments:
    """What a flagged sample keeps, and the budget, optimiser and early stopping of the fine-tune."""

    _argument_group_name = "retention and erase (the fine-tuning methods)"

    separation: str = field(
        default="belief",
        metadata={
            "help": "What a flagged sample keeps. 'belief': its given label, weighted by the model's current "
            "probability of it (p^belief_power, not differentiated), so corrupted labels the repaired model "
            "contradicts fade out and wrongly flagged clean samples come back; 'agreement': its label only while "
            "the model predicts it; 'soft': the model's predicted distribution (distils the model's mistakes; "
            "measured worse than erase); 'surgery': its label, but each step the flagged samples' summed gradient "
            "loses its component that conflicts with the other samples' gradient.",
            "choices": list(SEPARATIONS),
        },
    )
    belief_power: float = field(
        default=1.0, metadata={"help": "separation='belief': exponent of the label probability used as weight."}
    )
    retention_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Fine-tune budget in epochs of the training set (retention_epochs * len(train_dataset) / batch "
            "size optimizer steps), shared by all stages, so erase and retention cost the same."
        },
    )
    retention_warmup: Optional[float] = field(
        default=None,
        metadata={
            "help": "Share of the budget spent on the trusted rows (verified + unflagged) before flagged samples are "
            "admitted, so the model that judges them has first unlearnt what it memorised. None: 0.5 for "
            "'retention' (a model that memorised its labels believes them), 0 for 'projection+retention' whose "
            "projection was adopted (0.5 when it was not)."
        },
    )
    small_loss_trim: float = field(
        default=0.0,
        metadata={
            "help": "Share of each batch's unflagged training samples of each given label with the largest loss "
            "left out of each step (the small-loss trick of co-teaching), reached by a linear ramp over the first "
            "pass over the fine-tune set: it keeps a longer fine-tune from learning the corrupted samples "
            "identification missed. Rounded per label and batch: where the share times a label's samples in a batch "
            "is one half or less, none of them is left out. Verified samples are always kept. 0 turns it off. Method "
            "'auto''s retrain refinement uses retrain_small_loss_trim instead."
        },
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Train erase's fine-tune on each batch mixed with itself in a random order (mixup): inputs, "
            "targets and weights become lambda row + (1 - lambda) partner, lambda ~ Beta(alpha, alpha), which keeps "
            "it from fitting the corrupted samples identification missed. Floating-point model inputs (pixel "
            "values, features) are mixed themselves; for token ids, the output of the model's "
            "get_input_embeddings() is, and an attention mask becomes the pair's union. Needs method 'erase' and "
            "small_loss_trim=0. 0 turns it off. Method 'auto''s retrain refinement uses retrain_mixup_alpha instead."
        },
    )
    retention_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "AdamW learning rate of the fine-tune (constant; no weight decay). None: RepairCallback uses "
                  "the Trainer's learning_rate, otherwise 5e-4."},
    )
    retention_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Fine-tune batch size per process; None uses batch_size (RepairCallback: the Trainer's "
                  "per_device_train_batch_size)."},
    )
    retention_penalty: str = field(
        default="none",
        metadata={
            "help": "Pull towards the starting weights: 'l2' (proximal), 'fisher' (diagonal Fisher on verified "
            "samples, EWC-style) or 'none'. Measured: no gain over early stopping alone.",
            "choices": list(RETENTION_PENALTIES),
        },
    )
    retention_penalty_strength: float = field(
        default=0.01, metadata={"help": "Strength mu of the penalty mu/2 * sum F_i (theta_i - theta0_i)^2."}
    )
    retention_eval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Score held-out verified samples every this many steps; None: ten times per stage."},
    )
    retention_patience: int = field(
        default=5, metadata={"help": "Stop a stage after this many evaluations without a lower held-out loss."}
    )

    def validate(self) -> None:
        if self.separation not in SEPARATIONS:
            raise ValueError(f"Unknown separation {self.separation!r}; choose one of {list(SEPARATIONS)}.")
        if self.retention_penalty not in RETENTION_PENALTIES:
            raise ValueError(f"retention_penalty must be one of {list(RETENTION_PENALTIES)}, got {self.retention_penalty!r}.")
        if not self.retention_epochs > 0:
            raise ValueError(f"retention_epochs must be positive, got {self.retention_epochs}.")
        if self.retention_warmup is not None and not 0.0 <= self.retention_warmup < 1.0:
            raise ValueError(f"retention_warmup must be in [0, 1) (a share of the budget), got {self.retention_warmup}.")
        if not 0.0 <= self.small_loss_trim < 0.5:
            raise ValueError(f"small_loss_trim must be in [0, 0.5) (a share of each batch's training samples), got "
                             f"{self.small_loss_trim}.")
        if not self.mixup_alpha >= 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha}.")
        method = getattr(self, "method", "erase")  # RepairConfig's (CommonArguments)
        if self.mixup_alpha > 0 and not (method.endswith("erase") or method == "auto"):
            raise ValueError(f"mixup_alpha mixes erase's fully trusted rows: it applies to methods 'erase', "
                             f"'projection+erase' and 'auto' (its erase), not {method!r}.")
        if self.mixup_alpha > 0 and self.small_loss_trim > 0:
            raise ValueError("mixup_alpha and small_loss_trim both guard against the corruption identification missed, "
                             "and a trimmed row cannot be mixed; use one of them.")
        if self.retention_learning_rate is not None and not self.retention_learning_rate > 0:
            raise ValueError(f"retention_learning_rate must be positive, got {self.retention_learning_rate}.")
        if self.retention_batch_size is not None and self.retention_batch_size < 1:
            raise ValueError(f"retention_batch_size must be positive, got {self.retention_batch_size}.")
        if self.retention_penalty_strength < 0 or self.belief_power < 0:
            raise ValueError("retention_penalty_strength and belief_power must be >= 0.")
        if self.retention_eval_steps is not None and self.retention_eval_steps < 1:
            raise ValueError(f"retention_eval_steps must be positive, got {self.retention_eval_steps}.")
        if self.retention_patience < 1:
            raise ValueError(f"retention_patience must be at least 1, got {self.retention_patience}.")
