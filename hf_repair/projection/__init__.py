"""One-shot clean-space projection (Verifix): capture Grams, decompose, choose alpha by k-fold, project, save."""

from .clean_space import CleanSpace
from .pipeline import LayerRecord, ProjectionResult, project
from .saving import RepairMismatchError

__all__ = ["CleanSpace", "LayerRecord", "ProjectionResult", "RepairMismatchError", "project"]
