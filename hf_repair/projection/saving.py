"""The on-disk format of a saved projection repair.

The clean spaces go to `safetensors` (never pickle), everything else to JSON (written atomically by
`hf_repair.utils.files`), and a model is checked against the saved layer names, kinds, shapes and
weight fingerprints before a repair is re-applied to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..modeling.layers import LayerAdapter
from ..modeling.targets import named_layers
from ..utils.files import PathLike
from .clean_space import CleanSpace

RESULT_NAME = "repair_result.json"
SPACES_NAME = "clean_spaces.safetensors"
# 1: every clean space d x d; 2: a basis may be thin, d x m with m < d; 3: a repair that was not adopted has none.
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)


class RepairMismatchError(ValueError):
    """A saved repair does not fit the model it is applied to."""



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
        if basis.dim() != 2 or basis.shape[1] > basis.shape[0] or energies.shape != basis.shape[1:]:
            raise ValueError(
                f"{path}: the clean space of {group!r} has basis {tuple(basis.shape)} and energies "
                f"{tuple(energies.shape)}; expected (d, m) with m <= d and (m,). The file is corrupt."
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

    Names are compared without wrapper prefixes (DDP's `module.`, `torch.compile`'s `_orig_mod.`, peft's
    `base_model.model.`), as `find_target_modules` names them.
    """
    modules = named_layers(model)
    targets: dict[str, tuple[nn.Module, LayerAdapter]] = {}
    problems: list[str] = []
    for name, kind in kinds.items():
        module, adapter = modules.get(name, (None, None))
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
    fingerprints: Mapping[str, str | None] | None = None,
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
