"""Writing projected weights W_original M(alpha) for any alpha, cheaply."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..modeling.layers import LayerAdapter
from ..modeling.weights import WeightSnapshot
from .clean_space import CleanSpace


class Projector:
    """Sets target weights to W_original M(alpha) for any alpha, cheaply.

    With M = U diag(lambda) U^T, W M = ((W U) diag(lambda)) U^T: W U is computed once per set of
    spaces, so each further alpha costs out x d x m per layer (m = d, or the rank of a thin space)
    instead of a d^3 product. The products run in the dtype of the spaces' bases.
    """

    def __init__(self, targets: dict[str, tuple[nn.Module, LayerAdapter]], snapshot: WeightSnapshot,
                 groups: dict[str, list[str]], spaces: dict[str, CleanSpace]) -> None:
        self.targets = targets
        self.snapshot = snapshot
        self.groups = groups
        self.spaces = spaces
        self._rotated: dict[str, torch.Tensor] = {}
        for leader, members in groups.items():
            basis = spaces[leader].basis
            for name in members:
                original = snapshot.original(name).to(device=basis.device, dtype=basis.dtype)
                self._rotated[name] = targets[name][1].as_matrix(original) @ basis

    def apply(self, alpha: float | Mapping[str, float | None]) -> None:
        """One alpha for every layer, or one per clean space (None leaves that space's layers as trained)."""
        for leader, members in self.groups.items():
            group_alpha = alpha.get(leader) if isinstance(alpha, Mapping) else alpha
            if group_alpha is None:
                for name in members:
                    self.snapshot.write(name, self.snapshot.original(name))
                continue
            space = self.spaces[leader]
            importance, basis_t = space.importance(group_alpha).to(space.basis.dtype), space.basis.t()
            for name in members:
                matrix = (self._rotated[name] * importance) @ basis_t
                self.snapshot.write(name, self.targets[name][1].from_matrix(matrix, self.snapshot.original(name)))
