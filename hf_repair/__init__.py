"""hf_repair: repair models trained on noisy labels with a small verified split."""

from .integrations.callback import RepairCallback
from .projection.clean_space import CleanSpace
from .config.repair_config import RepairConfig
from .identification.identify import IdentificationResult, identify_harmful
from .repairer import Repairer
from .results import LayerRecord, RepairResult
from .utils.files import RepairMismatchError, atomic_directory
from .modeling.targets import find_target_modules

__version__ = "0.1.0"

__all__ = [
    "CleanSpace",
    "IdentificationResult",
    "LayerRecord",
    "RepairCallback",
    "RepairConfig",
    "RepairMismatchError",
    "RepairResult",
    "Repairer",
    "atomic_directory",
    "find_target_modules",
    "identify_harmful",
]
