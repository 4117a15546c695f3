"""The fine-tuning repairs: beneficial retention and the erase baseline, each optionally after a projection."""

from .finetune_data import mixable
from .finetuner import FinetuneArguments, FinetuneResult, GuardedFinetuner
from .pipeline import heldout_scores, repair_with_finetuning
from .retention import RetentionRepair, RetentionResult, finetune_learning_rate

__all__ = [
    "FinetuneArguments",
    "FinetuneResult",
    "GuardedFinetuner",
    "RetentionRepair",
    "RetentionResult",
    "finetune_learning_rate",
    "heldout_scores",
    "mixable",
    "repair_with_finetuning",
]
