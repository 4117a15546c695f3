"""Identification: score, rank and flag the training samples that hurt a model, with a verified split."""

from .identify import identify_harmful
from .influence import InfluenceModel, TrackedLayer
from .posterior import label_confidence, label_posterior
from .probes import HeadRefit, LinearProbe, fit_probe, refit_head
from .ranking import auroc, average_ranks, flag_lowest
from .result import IdentificationResult

__all__ = [
    "HeadRefit",
    "IdentificationResult",
    "InfluenceModel",
    "LinearProbe",
    "TrackedLayer",
    "auroc",
    "average_ranks",
    "fit_probe",
    "flag_lowest",
    "identify_harmful",
    "label_confidence",
    "label_posterior",
    "refit_head",
]
