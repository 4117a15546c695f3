"""Writing repairs to disk so that an interrupted write never leaves a half-written directory.

Every directory hf_repair writes (a saved repair, a repaired model, a report) is built in a
temporary sibling directory and renamed into place only once it is complete: a crash, a
`KeyboardInterrupt` or a full disk leaves the target as it was (at most a hidden
`.NAME.tmp-*` sibling behind after a hard kill). Renames within one directory are atomic on
POSIX file systems.

This module also holds the on-disk format of a saved repair: the clean spaces go to
`safetensors` (never pickle), everything else to JSON, and a model is checked against the
saved layer names, kinds, shapes and weight fingerprints before a repair is re-applied to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..projection.clean_space import CleanSpace
from ..modeling.layers import LayerAdapter, adapter_for
from ..modeling.targets import canonical_name

PathLike = Union[str, os.PathLike]

RESULT_NAME = "repair_result.json"
SPACES_NAME = "clean_spaces.safetensors"
FORMAT_VERSION = 1


class RepairMismatchError(ValueError):
    """A saved repair does not fit the model it is applied to."""


# ------------------------------------------------------------------------------------------------
# atomic writes


def check_output_directory(path: PathLike, overwrite: bool = False) -> None:
    """Refuse a target that is a file, or a non-empty directory unless `overwrite`.

    Called before any work starts (so a long repair does not end in a refused write) and again
    right before the rename.
    """
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"{target} exists and is not a plain directory (a file or a symlink); choose another path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; choose a new directory or pass overwrite=True "
            f"(--overwrite on the command line) to replace it."
        )


@contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` when the block succeeds.

    On any exception the temporary directory is deleted and `path` is untouched. With
    `overwrite=True` an existing `path` is moved aside, replaced, and only then deleted, so a
    failure at the last step puts the old directory back. Run it on one process only (e.g.
    `if PartialState().is_main_process:`).

    Example:
        >>> with atomic_directory("out/repaired") as tmp:
        ...     model.save_pretrained(tmp)
    """
    target = Path(path).absolute()
    check_output_directory(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()  # not tempfile.mkdtemp: its 0o700 mode would end up on the final directory
    try:
        yield staging
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a file through a temporary sibling and `os.replace`, so readers never see half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_json(path: PathLike, data: Any) -> None:
    """`atomic_write_text` of indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    check_output_directory(target, overwrite)  # something may have appeared while we wrote
    if not target.exists():
        os.rename(staging, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(staging, target)
        return
    backup = _sibling(target, "old")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# saved-repair format


def save_clean_spaces(spaces: Mapping[str, CleanSpace], path: PathLike) -> None:
    """Each space's basis and energies as `{group}.basis` / `{group}.energies` safetensors entries."""
    tensors: dict[str, torch.Tensor] = {}
    for group, space in spaces.items():
        tensors[f"{group}.basis"] = space.basis.detach().cpu().contiguous()
        tensors[f"{group}.energies"] = space.energies.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "hf_repair_format": str(FORMAT_VERSION)})


def load_clean_spaces(path: PathLike, num_rows: Mapping[str, int]) -> dict[str, CleanSpace]:
    """The spaces of `save_clean_spaces`, for the groups named in `num_rows` (group -> verified rows)."""
    tensors = load_file(str(path))
    missing = [g for g in num_rows if f"{g}.basis" not in tensors or f"{g}.energies" not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the clean spaces of {missing}; the saved repair is incomplete or corrupt.")
    spaces = {}
    for group, rows in num_rows.items():
        basis, energies = tensors[f"{group}.basis"], tensors[f"{group}.energies"]
        if basis.dim() != 2 or basis.shape[0] != basis.shape[1] or energies.shape != basis.shape[:1]:
            raise ValueError(
                f"{path}: the clean space of {group!r} has basis {tuple(basis.shape)} and energies "
                f"{tuple(energies.shape)}; expected (d, d) and (d,). The file is corrupt."
            )
        spaces[group] = CleanSpace(basis=basis, energies=energies, num_rows=int(rows))
    return spaces


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes: tells whether a model holds exactly the weights a repair started from."""
    tensor = weight.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def find_saved_layers(model: nn.Module, kinds: Mapping[str, str]) -> dict[str, tuple[nn.Module, LayerAdapter]]:
    """The model's layers a saved repair names, or `RepairMismatchError` listing each missing or other-kind layer.

    Names are compared without wrapper prefixes (DDP's `module.`, `torch.compile`'s `_orig_mod.`).
    """
    modules = {canonical_name(name): module for name, module in model.named_modules()}
    targets: dict[str, tuple[nn.Module, LayerAdapter]] = {}
    problems: list[str] = []
    for name, kind in kinds.items():
        module = modules.get(name)
        adapter = adapter_for(module) if module is not None else None
        if module is None:
            problems.append(f"{name}: no such layer")
        elif adapter is None or adapter.kind != kind:
            problems.append(f"{name}: saved as {kind}, the model has {type(module).__name__}")
        else:
            targets[name] = (module, adapter)
    if problems:
        raise RepairMismatchError(
            f"This saved repair was made for another model: {len(problems)} of its {len(kinds)} layers are not in "
            f"{type(model).__name__}:\n  " + "\n  ".join(_first(problems))
        )
    return targets


def check_original_weights(
    weights: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
    fingerprints: Optional[Mapping[str, Optional[str]]] = None,
) -> None:
    """Refuse weights whose shape differs from the saved one, or (with `fingerprints`) whose bits differ.

    The fingerprint check refuses another checkpoint of the same architecture, a model loaded in
    another dtype, and a model the repair was already applied to (projecting twice is not a repair).
    """
    problems = [
        f"{name}: saved weight shape {tuple(shapes[name])}, the model has {tuple(weight.shape)}"
        for name, weight in weights.items()
        if tuple(weight.shape) != tuple(shapes[name])
    ]
    if problems:
        raise RepairMismatchError(
            f"This saved repair was made for another model: {len(problems)} of its {len(weights)} layers have "
            f"another weight shape:\n  " + "\n  ".join(_first(problems))
        )
    if fingerprints is None:
        return
    changed = [
        name for name, weight in weights.items()
        if fingerprints.get(name) is not None and weight_fingerprint(weight) != fingerprints[name]
    ]
    if changed:
        raise RepairMismatchError(
            f"The weights of {len(changed)} of {len(weights)} layers differ from those the repair started from "
            f"(e.g. {_first(changed, 5)}): this is another checkpoint of the same architecture, a model loaded "
            f"in another dtype, or a model the repair was already applied to. Load the original checkpoint, "
            f"or pass check_weights=False to project these weights anyway."
        )


def _first(items: list[str], limit: int = 20) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... ({len(items)} in all)"]
