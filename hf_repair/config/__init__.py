"""`RepairConfig` and the argument groups it is composed of."""

from .repair_config import FINETUNE_METHODS, METHODS, RepairConfig

__all__ = ["FINETUNE_METHODS", "METHODS", "RepairConfig"]
