"""hf_repair: repair models trained on noisy labels with a small verified split."""

from .config import RepairConfig
from .identification import IdentificationResult, identify_harmful
from .integrations.callback import RepairCallback
from .modeling.targets import find_target_modules
from .projection.clean_space import CleanSpace
from .projection.saving import RepairMismatchError
from .repairer import Repairer
from .results import LayerRecord, RepairResult
from .utils.files import atomic_directory
from .utils.version import __version__

__all__ = [
    "__version__",
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
