"""Where hf_repair meets training loops: the `transformers` `TrainerCallback`."""

from .callback import RepairCallback

__all__ = ["RepairCallback"]
