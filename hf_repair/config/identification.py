"""Arguments of identification (`Repairer.identify`): how training samples are scored and flagged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .projection import unwrap_keyword

IDENTIFICATION_SCORES = ("auto", "probe", "influence", "refit", "projection", "combined", "loss")
FLAG_RULES = ("noise_rate", "threshold", "budget")
INFLUENCE_AGGREGATIONS = ("negative_sum", "min", "mean", "balanced")
PRECONDITIONERS = ("auto", "exact", "kfac", "identity")


@dataclass
class IdentificationArguments:
    """Which training samples are harmful: the score, the flag rule, and the influence's layers and solver."""

    _argument_group_name = "identification (Repairer.identify and the fine-tuning methods)"

    score: str = field(
        default="auto",
        metadata={
            "help": "Per-sample score, lower = more harmful. 'probe': given-label log-likelihood under a softmax "
            "regression fitted on the verified split from the features the classifier MLP reads (the best measured, "
            "also on models that memorised their noisy labels); 'refit': the same under the head refitted on the "
            "verified split; 'influence': first-order influence on the verified loss, g_z^T H^-1 g_clean; "
            "'projection': the given-label log-likelihood under the projection-repaired model; 'combined': mean "
            "normalised rank of combine_scores; 'loss': the trained model's given-label log-likelihood (the "
            "loss-ranking baseline); 'auto': the probe, or the influence where the model has no layer with one "
            "input row per sample before the logits.",
            "choices": list(IDENTIFICATION_SCORES),
        },
    )
    combine_scores: list[str] = field(
        default_factory=lambda: ["probe", "projection"],
        metadata={"help": "Scores whose normalised ranks score='combined' averages."},
    )
    flag_rule: str = field(
        default="noise_rate",
        metadata={
            "help": "Which samples to flag: 'noise_rate' flags the estimated noise rate's share of lowest scores "
            "(the probe's predictions on the training set calibrated by its held-out confusion on the verified split, "
            "with an interval and a warning when it cannot be trusted; the share of negative influence without a "
            "probe); 'threshold' flags score < flag_threshold; 'budget' flags the flag_top_k or flag_fraction lowest.",
            "choices": list(FLAG_RULES),
        },
    )
    flag_threshold: float = field(
        default=0.0,
        metadata={
            "help": "flag_rule='threshold': flag samples scoring below this, in the score's units (influence: 0 is "
            "neutral; log-likelihood scores: e.g. log(0.5); 'combined': a rank fraction in [0, 1])."
        },
    )
    flag_fraction: Optional[float] = field(
        default=None, metadata={"help": "flag_rule='budget': flag this fraction (0, 1] of the training set."}
    )
    flag_top_k: Optional[int] = field(
        default=None, metadata={"help": "flag_rule='budget': flag this many samples (instead of flag_fraction)."}
    )
    influence_modules: Union[list[str], None, str] = field(
        default=None,
        metadata={
            "help": "Layers whose per-sample gradients the influence uses, matched like target_modules. None: the "
            "classification head (the layer whose output is the logits, closed-form gradients) and the "
            "influence_depth - 1 layers that run just before it."
        },
    )
    probe_module: Optional[str] = field(
        default=None,
        metadata={
            "help": "Layer whose input the 'probe' score reads. None: the first layer of the classifier MLP that "
            "ends at the head (walking back from it while layers see one row per sample)."
        },
    )
    influence_depth: int = field(
        default=1, metadata={"help": "With influence_modules=None: how many layers, ending at the head, to track."}
    )
    influence_aggregation: str = field(
        default="negative_sum",
        metadata={
            "help": "How the per-class verified influences s_c(z) combine: 'negative_sum' (sum of the harm done to "
            "each class), 'min' (the most harmed class), 'mean' (the mean verified gradient) or 'balanced' "
            "(classes weighted equally).",
            "choices": list(INFLUENCE_AGGREGATIONS),
        },
    )
    preconditioner: str = field(
        default="auto",
        metadata={
            "help": "Gauss-Newton approximation: 'exact' block per layer, 'kfac' (Kronecker-factored), 'auto' (exact "
            "for a closed-form head of up to 4096 parameters, K-FAC otherwise) or 'identity'.",
            "choices": ["auto", "exact", "kfac", "identity"],
        },
    )
    damping: float = field(
        default=1e-3,
        metadata={"help": "Damping added to the Gauss-Newton matrix, relative to its mean eigenvalue."},
    )

    def validate(self) -> None:
        self.influence_modules = unwrap_keyword(self.influence_modules)
        self.combine_scores = list(self.combine_scores)
        if self.score not in IDENTIFICATION_SCORES:
            raise ValueError(f"Unknown score {self.score!r}; choose one of {list(IDENTIFICATION_SCORES)}.")
        combinable = [s for s in IDENTIFICATION_SCORES if s not in ("auto", "combined")]
        if not self.combine_scores or any(s not in combinable for s in self.combine_scores):
            raise ValueError(f"combine_scores must be a non-empty list drawn from {combinable}, got {self.combine_scores}.")
        if self.flag_rule not in FLAG_RULES:
            raise ValueError(f"Unknown flag_rule {self.flag_rule!r}; choose one of {list(FLAG_RULES)}.")
        if self.flag_fraction is not None and not 0.0 < self.flag_fraction <= 1.0:
            raise ValueError(f"flag_fraction must be in (0, 1], got {self.flag_fraction}.")
        if self.flag_top_k is not None and self.flag_top_k < 0:
            raise ValueError(f"flag_top_k must be >= 0, got {self.flag_top_k}.")
        if self.flag_rule == "budget" and (self.flag_fraction is None) == (self.flag_top_k is None):
            raise ValueError("flag_rule='budget' needs exactly one of flag_fraction or flag_top_k.")
        if self.influence_depth < 1:
            raise ValueError(f"influence_depth must be at least 1 (the head), got {self.influence_depth}.")
        if self.influence_aggregation not in INFLUENCE_AGGREGATIONS:
            raise ValueError(
                f"Unknown influence_aggregation {self.influence_aggregation!r}; choose one of {list(INFLUENCE_AGGREGATIONS)}."
            )
        if self.preconditioner not in ("auto", "exact", "kfac", "identity"):
            raise ValueError(f"preconditioner must be 'auto', 'exact', 'kfac' or 'identity', got {self.preconditioner!r}.")
        if not self.damping > 0:
            raise ValueError(f"damping must be positive (it keeps the Gauss-Newton solve well posed), got {self.damping}.")
