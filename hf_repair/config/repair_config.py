"""`RepairConfig`: every knob of a repair in one dataclass.

It reads like `TrainingArguments` (help metadata, so `HfArgumentParser` turns it into command
line flags next to `TrainingArguments`) and saves like `PeftConfig` (`save_pretrained` /
`from_pretrained` to a `repair_config.json`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

CONFIG_NAME = "repair_config.json"

METHODS = ("projection", "retention", "erase", "projection+retention", "projection+erase")
FINETUNE_METHODS = METHODS[1:]  # the methods that fine-tune on the training set
TARGET_KEYWORDS = ("all-linear", "all")
# identification
IDENTIFICATION_SCORES = ("auto", "probe", "influence", "refit", "projection", "combined", "loss")
FLAG_RULES = ("noise_rate", "threshold", "budget")
# retention
SEPARATIONS = ("belief", "agreement", "soft", "surgery")
RETENTION_PENALTIES = ("none", "l2", "fisher")
INFLUENCE_AGGREGATIONS = ("negative_sum", "min", "mean", "balanced")


def _default_alphas() -> list[float]:
    # From a near-collapse (alpha=1: weights scaled by each direction's energy share) to a
    # near-identity: small models need small alphas, wide transformers need large ones.
    return [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6, 1e7]


# Fields whose plain names `TrainingArguments` already has carry a `repair_` prefix, so that
# `HfArgumentParser((TrainingArguments, RepairConfig))` never sees two `--seed` flags. In Python
# the plain names work too: `RepairConfig(seed=0)`, `config.seed`.
SHARED_NAME_ALIASES = {
    "seed": "repair_seed",
    "disable_tqdm": "repair_disable_tqdm",
    "greater_is_better": "repair_greater_is_better",
}


def _accept_aliases(cls: type) -> type:
    generated_init = cls.__init__

    @functools.wraps(generated_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for alias, name in SHARED_NAME_ALIASES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise TypeError(f"Pass {alias!r} or {name!r}, not both.")
                kwargs[name] = kwargs.pop(alias)
        generated_init(self, *args, **kwargs)

    cls.__init__ = __init__
    for alias, name in SHARED_NAME_ALIASES.items():
        setattr(cls, alias, property(lambda self, n=name: getattr(self, n),
                                     lambda self, value, n=name: setattr(self, n, value)))
    return cls


@_accept_aliases
@dataclass
class RepairConfig:
    """How to repair a trained model with a verified (hand-checked) split.

    Example:
        >>> config = RepairConfig(method="projection", target_modules="all-linear", seed=0)

    `transformers.HfArgumentParser((TrainingArguments, RepairConfig))` turns it into command line flags
    next to the training ones; there the fields whose plain name `TrainingArguments` already has are
    `--repair_seed`, `--repair_disable_tqdm` and `--repair_greater_is_better`.
    """

    method: str = field(
        default="projection",
        metadata={
            "help": "Repair method. 'projection': one-shot clean-space projection, verified split only. The others "
            "fine-tune briefly on the training set (repair(verified, train_dataset=...)) after identifying its "
            "harmful samples: 'retention' keeps the flagged samples, each label weighted by how far the model "
            "believes it; 'erase' drops them (the baseline); 'projection+retention' / 'projection+erase' project first.",
            "choices": list(METHODS),
        },
    )
    # `Union[list[str], None, str]`, in this order: HfArgumentParser reads the type before NoneType,
    # so on the command line these are lists (`--target_modules query value`); it takes the default
    # of a list field only from a default_factory.
    target_modules: Union[list[str], None, str] = field(
        default_factory=lambda: "all-linear",
        metadata={
            "help": "Layers to repair: a list of exact names or dotted suffixes, a regex (matched with "
            "re.fullmatch against the full module name), 'all-linear' (every nn.Linear and "
            "transformers Conv1D) or 'all' (also nn.Conv2d). A single value with regex characters "
            "(*+?()[]{}|^$\\) is a regex: module names never contain them."
        },
    )
    exclude_modules: Union[list[str], None, str] = field(
        default=None,
        metadata={"help": "Layers never repaired, with the same matching rules as target_modules."},
    )
    alphas: list[float] = field(
        default_factory=_default_alphas,
        metadata={
            "help": "Grid of importance-scaling strengths to choose from. alpha=1 scales each clean "
            "direction by its energy share; alpha -> infinity keeps every direction the verified "
            "data uses (identity on their span)."
        },
    )
    num_folds: int = field(
        default=3,
        metadata={
            "help": "Folds for choosing alpha: the clean space is built on k-1 folds of the verified "
            "split and scored on the held-out fold, so no oracle clean split is needed."
        },
    )
    alpha_scope: str = field(
        default="global",
        metadata={
            "help": "'global': one alpha for every layer. 'layer': then, clean space by clean space, try every "
            "alpha and no projection, keeping a change only if the held-out score improves (costs one pass "
            "over the verified split per space and alpha).",
            "choices": ["global", "layer"],
        },
    )
    min_improvement: float = field(
        default=0.0,
        metadata={
            "help": "The repair is adopted only if the held-out selection metric beats the unrepaired "
            "model by more than this; otherwise every weight is left bit-identical."
        },
    )
    metric_for_selection: str = field(
        default="accuracy",
        metadata={"help": "Key of the metric (from compute_metrics, if given) used to choose alpha."},
    )
    repair_greater_is_better: bool = field(
        default=True, metadata={"help": "Whether a larger metric_for_selection is better."}
    )
    label_column: str = field(default="labels", metadata={"help": "Column of the verified labels."})
    batch_size: int = field(
        default=64, metadata={"help": "Batch size for capturing activations and scoring alphas."}
    )
    gram_dtype: str = field(
        default="float64",
        metadata={
            "help": "Accumulation dtype of the per-layer Gram matrices. The Gram squares the condition "
            "number, so float64 unless memory forbids it.",
            "choices": ["float64", "float32"],
        },
    )
    repair_seed: int = field(default=0, metadata={"help": "Seed for the fold split; makes a repair reproducible."})
    repair_disable_tqdm: bool = field(default=False, metadata={"help": "Hide the repair's progress bars."})

    # identification (`Repairer.identify` / `hf_repair.identification`): which training samples are harmful
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
            "(the share of given labels the probe disagrees with, corrected for the probe's held-out error; the "
            "share of negative influence without a probe); 'threshold' flags score < flag_threshold; 'budget' "
            "flags the flag_top_k or flag_fraction lowest.",
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

    # retention (methods "retention", "erase", "projection+retention"; `hf_repair.retention`): the guarded fine-tune
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
    retention_learning_rate: float = field(
        default=5e-4, metadata={"help": "AdamW learning rate of the fine-tune (constant; no weight decay)."}
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

    def __post_init__(self) -> None:
        # HfArgumentParser hands `--target_modules all-linear` (or a regex) over as a one-element list.
        self.target_modules = _unwrap_keyword(self.target_modules)
        self.exclude_modules = _unwrap_keyword(self.exclude_modules)
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {list(METHODS)}.")
        if self.target_modules is None or (
            isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) == 0
        ):
            raise ValueError("target_modules is empty; pass layer names, a regex, 'all-linear' or 'all'.")
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be at least 2 to hold out verified samples, got {self.num_folds}.")
        if not self.alphas:
            raise ValueError("alphas is empty; give at least one alpha >= 1.")
        self.alphas = sorted(float(a) for a in self.alphas)
        if self.alphas[0] < 1.0:
            raise ValueError(f"Every alpha must be >= 1 (alpha < 1 amplifies weak directions), got {self.alphas}.")
        if self.alpha_scope not in ("global", "layer"):
            raise ValueError(f"alpha_scope must be 'global' or 'layer', got {self.alpha_scope!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
        if self.gram_dtype not in ("float64", "float32"):
            raise ValueError(f"gram_dtype must be 'float64' or 'float32', got {self.gram_dtype!r}.")
        _check_identification(self)  # identification
        _check_retention(self)  # retention

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "RepairConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}; was it written by save_pretrained?")
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; it was written by another hf_repair version.")
        return cls(**values)


def _unwrap_keyword(value: Optional[Union[list[str], str]]) -> Optional[Union[list[str], str]]:
    if isinstance(value, (list, tuple)) and len(value) == 1 and (
        value[0] in TARGET_KEYWORDS or re.search(r"[*+?()\[\]{}|^$\\]", value[0])
    ):
        return value[0]
    if isinstance(value, tuple):
        return list(value)
    return value


# identification
def _check_identification(config: RepairConfig) -> None:
    config.influence_modules = _unwrap_keyword(config.influence_modules)
    config.combine_scores = list(config.combine_scores)
    if config.score not in IDENTIFICATION_SCORES:
        raise ValueError(f"Unknown score {config.score!r}; choose one of {list(IDENTIFICATION_SCORES)}.")
    combinable = [s for s in IDENTIFICATION_SCORES if s not in ("auto", "combined")]
    if not config.combine_scores or any(s not in combinable for s in config.combine_scores):
        raise ValueError(f"combine_scores must be a non-empty list drawn from {combinable}, got {config.combine_scores}.")
    if config.flag_rule not in FLAG_RULES:
        raise ValueError(f"Unknown flag_rule {config.flag_rule!r}; choose one of {list(FLAG_RULES)}.")
    if config.flag_fraction is not None and not 0.0 < config.flag_fraction <= 1.0:
        raise ValueError(f"flag_fraction must be in (0, 1], got {config.flag_fraction}.")
    if config.flag_top_k is not None and config.flag_top_k < 0:
        raise ValueError(f"flag_top_k must be >= 0, got {config.flag_top_k}.")
    if config.flag_rule == "budget" and (config.flag_fraction is None) == (config.flag_top_k is None):
        raise ValueError("flag_rule='budget' needs exactly one of flag_fraction or flag_top_k.")
    if config.influence_depth < 1:
        raise ValueError(f"influence_depth must be at least 1 (the head), got {config.influence_depth}.")
    if config.influence_aggregation not in INFLUENCE_AGGREGATIONS:
        raise ValueError(
            f"Unknown influence_aggregation {config.influence_aggregation!r}; choose one of {list(INFLUENCE_AGGREGATIONS)}."
        )
    if config.preconditioner not in ("auto", "exact", "kfac", "identity"):
        raise ValueError(f"preconditioner must be 'auto', 'exact', 'kfac' or 'identity', got {config.preconditioner!r}.")
    if not config.damping > 0:
        raise ValueError(f"damping must be positive (it keeps the Gauss-Newton solve well posed), got {config.damping}.")


def _check_retention(config: RepairConfig) -> None:
    if config.separation not in SEPARATIONS:
        raise ValueError(f"Unknown separation {config.separation!r}; choose one of {list(SEPARATIONS)}.")
    if config.retention_penalty not in RETENTION_PENALTIES:
        raise ValueError(f"retention_penalty must be one of {list(RETENTION_PENALTIES)}, got {config.retention_penalty!r}.")
    if not config.retention_epochs > 0:
        raise ValueError(f"retention_epochs must be positive, got {config.retention_epochs}.")
    if config.retention_warmup is not None and not 0.0 <= config.retention_warmup < 1.0:
        raise ValueError(f"retention_warmup must be in [0, 1) (a share of the budget), got {config.retention_warmup}.")
    if not config.retention_learning_rate > 0:
        raise ValueError(f"retention_learning_rate must be positive, got {config.retention_learning_rate}.")
    if config.retention_batch_size is not None and config.retention_batch_size < 1:
        raise ValueError(f"retention_batch_size must be positive, got {config.retention_batch_size}.")
    if config.retention_penalty_strength < 0 or config.belief_power < 0:
        raise ValueError("retention_penalty_strength and belief_power must be >= 0.")
    if config.retention_eval_steps is not None and config.retention_eval_steps < 1:
        raise ValueError(f"retention_eval_steps must be positive, got {config.retention_eval_steps}.")
    if config.retention_patience < 1:
        raise ValueError(f"retention_patience must be at least 1, got {config.retention_patience}.")
