"""Reading the states of a training run offline: `checkpoint-*` folders of a `Trainer` output_dir, or state dicts.

A checkpoint folder holds the model's weights as `Trainer` saved them (`model.safetensors`, a sharded
`model.safetensors.index.json`, or the `pytorch_model.bin` equivalents); its step comes from its name
and its epoch from the `trainer_state.json` beside the weights. `save_pretrained` leaves out weights
tied to another (an output layer tied to the embeddings); loading fills them through the tie. A
transformers model's checkpoint is read through `from_pretrained`, which undoes the renaming and
conversion `save_pretrained` applied to its weights. A PeftModel's checkpoint holds its adapter
(`adapter_model.safetensors`), read onto the model's own frozen base.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..modeling.lora import is_adapter_checkpoint, read_adapter_checkpoint

StateDict = dict[str, torch.Tensor]
Checkpoints = str | os.PathLike | Sequence[str | os.PathLike | StateDict]
TRAINER_STATE_NAME = "trainer_state.json"
_STEP = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def list_checkpoints(checkpoints: Checkpoints) -> list[str | StateDict]:
    """The states in training order: a `Trainer` output_dir's `checkpoint-*` folders (by step), one checkpoint
    folder, or a list of checkpoint folders and state dicts as given."""
    if isinstance(checkpoints, (str, os.PathLike)):
        folder = Path(checkpoints)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoints={str(folder)!r} is not a folder.")
        found = sort_checkpoints(str(folder))
        if found:
            return found
        if _weights_files(folder) or is_adapter_checkpoint(folder):
            return [str(folder)]
        raise FileNotFoundError(f"{folder} has no {PREFIX_CHECKPOINT_DIR}-* folders and no model weights; pass the "
                                f"Trainer output_dir that its checkpoints were saved in (save_strategy != 'no').")
    states = list(checkpoints)
    for state in states:
        if not isinstance(state, (str, os.PathLike, dict)):
            raise TypeError(f"checkpoints must be folders or state dicts, got {type(state).__name__}.")
    return [state if isinstance(state, dict) else str(state) for state in states]


def checkpoint_position(folder: str) -> tuple[int | None, float | None]:
    """(step, epoch) of a checkpoint folder, from its name and its trainer_state.json (None where unknown)."""
    match = _STEP.search(Path(folder).name)
    step = int(match.group(1)) if match else None
    epoch = None
    state_file = Path(folder) / TRAINER_STATE_NAME
    if state_file.is_file():
        with open(state_file) as f:
            trainer_state = json.load(f)
        step = trainer_state.get("global_step", step)
        epoch = trainer_state.get("epoch")
    return step, epoch


def read_checkpoint(folder: str | os.PathLike, model: nn.Module | None = None) -> StateDict:
    """The weights saved in a checkpoint folder, on CPU, named as `model.state_dict()` names them.

    `save_pretrained` may store a transformers model's weights under other names or layouts than the model
    uses (its checkpoint conversion mapping); given such a `model`, the folder is loaded the way
    `from_pretrained` loads it. Other checkpoints (`Trainer` saves a plain module's state dict) are read as is.
    """
    if model is not None and is_adapter_checkpoint(folder):
        return read_adapter_checkpoint(folder, model)
    files = _weights_files(Path(folder))
    if not files:
        raise FileNotFoundError(f"{folder} holds no {SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or sharded index.")
    if isinstance(model, PreTrainedModel) and (Path(folder) / CONFIG_NAME).is_file():
        loaded = type(model).from_pretrained(folder, dtype=model.dtype)
        return {key: value.detach().to("cpu", copy=True) for key, value in loaded.state_dict().items()}
    state: StateDict = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(safetensors.torch.load_file(str(file), device="cpu"))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def load_weights(model: nn.Module, state: StateDict) -> None:
    """Copy `state` into `model` in place; keys it lacks must be tied to keys it has."""
    check_state_keys(model, state, "A trajectory state")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)


def check_state_keys(model: nn.Module, state: StateDict, what: str) -> None:
    """Raise if `state` has keys the model lacks, or lacks weights of the model that are not tied to keys it has."""
    current = model.state_dict()
    unexpected = [key for key in state if key not in current]
    if unexpected:
        raise ValueError(f"{what} has keys the model does not: {unexpected[:5]}; it is of another model.")
    loaded = {_storage(value) for key, value in current.items() if key in state}
    untied = [key for key in current if key not in state and _storage(current[key]) not in loaded]
    if untied:
        raise ValueError(f"{what} lacks the model's weights {untied[:5]}; it is of another model.")


def same_weights(model: nn.Module, state: StateDict) -> bool:
    """Whether the model's weights equal `state`, bit for bit, on every key `state` has."""
    current = model.state_dict()
    return all(key in current and torch.equal(current[key].detach().cpu(), value) for key, value in state.items())


def _weights_files(folder: Path) -> list[Path]:
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            with open(folder / index) as f:
                weight_map: dict[str, Any] = json.load(f)["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    return []


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()
