"""`RepairConfig` and the argument groups, one per phase, it is composed of."""

from .common import FINETUNE_METHODS, HEAD_REFIT_METHODS, METHODS, CommonArguments
from .identification import IdentificationArguments
from .projection import ProjectionArguments
from .repair_config import ARGUMENT_GROUPS, CONFIG_NAME, RepairConfig
from .retention import RetentionArguments
from .selection import SIGNIFICANCE_TESTS, SelectionArguments
from .trajectory import AUTO_CANDIDATES, TrajectoryArguments

__all__ = [
    "AUTO_CANDIDATES",
    "ARGUMENT_GROUPS",
    "CONFIG_NAME",
    "FINETUNE_METHODS",
    "HEAD_REFIT_METHODS",
    "METHODS",
    "SIGNIFICANCE_TESTS",
    "CommonArguments",
    "IdentificationArguments",
    "ProjectionArguments",
    "RepairConfig",
    "RetentionArguments",
    "SelectionArguments",
    "TrajectoryArguments",
]
