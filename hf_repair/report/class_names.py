"""Names of the class ids, from whichever source names them: the caller, the data or the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
from torch import nn


def resolve_class_names(given: Sequence[str] | None, sources: Sequence[datasets.Dataset | None],
                        label_column: str, model: nn.Module | None) -> list[str] | None:
    """class_names, else a ClassLabel feature of the data, else the model's id2label (unless default), else None."""
    if given is not None:
        return [str(n) for n in given]
    for dataset in sources:
        feature = dataset.features.get(label_column) if dataset is not None else None
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label:
        names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]
        if names != [f"LABEL_{i}" for i in range(len(names))]:
            return names
    return None


def class_name(names: list[str] | None, label: Any) -> str:
    """The name of one class id ("-" for a negative id, the id itself when unnamed)."""
    label = int(label)
    if label < 0:
        return "-"
    return names[label] if names is not None and label < len(names) else str(label)
