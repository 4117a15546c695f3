"""`RepairConfig` and the argument groups it is composed of."""

from .repair_config import RepairConfig

__all__ = ["RepairConfig"]
