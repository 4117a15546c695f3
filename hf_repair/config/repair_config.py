"""`RepairConfig`: every knob of a repair in one flat dataclass, declared per phase.

It reads like `TrainingArguments` (help metadata, so `HfArgumentParser` turns it into command
line flags next to `TrainingArguments`) and saves like `PeftConfig` (`save_pretrained` /
`from_pretrained` to a `repair_config.json`). Its fields come from one argument group per phase
(`CommonArguments`, `SelectionArguments`, `ProjectionArguments`, `IdentificationArguments`,
`RetentionArguments`, `TrajectoryArguments`), each of which validates its own fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from .common import CommonArguments
from .identification import IdentificationArguments
from .projection import ProjectionArguments
from .retention import RetentionArguments
from .selection import SelectionArguments
from .trajectory import TrajectoryArguments

CONFIG_NAME = "repair_config.json"
ARGUMENT_GROUPS = (CommonArguments, SelectionArguments, ProjectionArguments, IdentificationArguments, RetentionArguments,
                   TrajectoryArguments)

# Fields whose plain names `TrainingArguments` already has carry a `repair_` prefix, so that
# `HfArgumentParser((TrainingArguments, RepairConfig))` never sees two `--seed` flags. In Python
# the plain names work too: `RepairConfig(seed=0)`, `config.seed`.
SHARED_NAME_ALIASES = {
    "seed": "repair_seed",
    "disable_tqdm": "repair_disable_tqdm",
    "greater_is_better": "repair_greater_is_better",
}


def _accept_aliases(cls: type) -> type:
    generated_init = cls.__init__

    @functools.wraps(generated_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for alias, name in SHARED_NAME_ALIASES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise TypeError(f"Pass {alias!r} or {name!r}, not both.")
                kwargs[name] = kwargs.pop(alias)
        generated_init(self, *args, **kwargs)

    cls.__init__ = __init__
    for alias, name in SHARED_NAME_ALIASES.items():
        setattr(cls, alias, property(lambda self, n=name: getattr(self, n),
                                     lambda self, value, n=name: setattr(self, n, value)))
    return cls


@_accept_aliases
@dataclass
class RepairConfig(TrajectoryArguments, RetentionArguments, IdentificationArguments, ProjectionArguments,
                   SelectionArguments, CommonArguments):
    """How to repair a trained model with a verified (hand-checked) split.

    Example:
        >>> config = RepairConfig(method="projection", target_modules="all-linear", seed=0)

    `transformers.HfArgumentParser((TrainingArguments, RepairConfig))` turns it into command line flags
    next to the training ones; there the fields whose plain name `TrainingArguments` already has are
    `--repair_seed`, `--repair_disable_tqdm` and `--repair_greater_is_better`.
    """

    # One group for every repair flag next to `TrainingArguments` (the per-phase groups are for `hf-repair`).
    _argument_group_name = "repair (hf_repair.RepairConfig)"

    def __post_init__(self) -> None:
        for group in ARGUMENT_GROUPS:
            group.validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> RepairConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}; was it written by save_pretrained?")
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; it was written by another hf_repair version.")
        return cls(**values)
