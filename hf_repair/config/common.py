"""Arguments every repair method shares: which method, how verified samples are split, batched and judged."""

from __future__ import annotations

from dataclasses import dataclass, field

FINETUNE_METHODS = ("retention", "erase", "projection+retention", "projection+erase")  # fine-tune on the training set
HEAD_REFIT_METHODS = ("head_refit", "projection+head_refit")
METHODS = ("projection", *FINETUNE_METHODS, *HEAD_REFIT_METHODS, "auto")


@dataclass
class CommonArguments:
    """The method, the verified folds that choose and judge a repair, batching and seeding."""

    _argument_group_name = "repair (every method)"

    method: str = field(
        default="projection",
        metadata={
            "help": "Repair method. 'projection': one-shot clean-space projection, verified split only. The others "
            "fine-tune briefly on the training set (repair(verified, train_dataset=...)) after identifying its "
            "harmful samples: 'retention' keeps the flagged samples, each label weighted by how far the model "
            "believes it; 'erase' drops them (the baseline); 'projection+retention' / 'projection+erase' project first. "
            "'head_refit': refit the classification head on the verified split (a regularised softmax regression on "
            "the features it reads), judged out-of-fold; 'projection+head_refit' projects first. 'auto': choose among "
            "the final weights, the best point of the training trajectory, weight averages and soups of its best "
            "points, and head refit / projection / erase on top, by held-out verified folds (RepairCallback, or "
            "repair(verified, checkpoints=<Trainer output_dir>)); it judges candidates by accuracy.",
            "choices": list(METHODS),
        },
    )
    num_folds: int = field(
        default=3,
        metadata={
            "help": "Folds for choosing alpha: the clean space is built on k-1 folds of the verified "
            "split and scored on the held-out fold, so no oracle clean split is needed."
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
    repair_seed: int = field(default=0, metadata={"help": "Seed for the fold split; makes a repair reproducible."})
    repair_disable_tqdm: bool = field(default=False, metadata={"help": "Hide the repair's progress bars."})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {list(METHODS)}.")
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be at least 2 to hold out verified samples, got {self.num_folds}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
