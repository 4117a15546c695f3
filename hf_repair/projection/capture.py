"""Streaming capture of per-layer input Grams through forward pre-hooks (`hf_repair.modeling.hooks`).

Memory is O(d^2) per distinct layer input and per fold, independent of how many samples or
tokens flow through. Layers fed the very same tensor (q, k and v of an attention block) are
grouped on first sight and share one Gram, hence one clean space.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling.hooks import LayerHooks
from ..modeling.layers import LayerAdapter
from ..utils.distributed import sum_across_processes


class NonFiniteActivationError(ValueError):
    pass


class GramCollector(LayerHooks):
    """Accumulates sum x x^T of each target layer's input rows, one Gram per fold ("slot").

    Use as a context manager around forward passes; set `begin_batch(slot, token_mask)` before
    each forward so rows land in the right fold and padded tokens are dropped.
    """

    def __init__(self, targets: dict[str, tuple[nn.Module, LayerAdapter]], num_slots: int,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__({name: module for name, (module, _) in targets.items()})
        self.targets = targets
        self.num_slots = num_slots
        self.dtype = dtype
        self.leader: dict[str, str] = {}  # layer name -> name of the layer whose Gram it shares
        self.grams: dict[str, torch.Tensor] = {}  # leader -> (num_slots, d, d)
        self.rows: dict[str, torch.Tensor] = {}  # leader -> (num_slots,) row counts
        self._slot = 0
        self._token_mask: torch.Tensor | None = None
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._seen.clear()

    def begin_batch(self, slot: int, token_mask: torch.Tensor | None = None) -> None:
        self._slot = slot
        self._token_mask = token_mask
        self._seen.clear()  # tensors are only shared within one forward pass

    def on_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        adapter = self.targets[name][1]
        key = (id(x), adapter.row_signature(module))
        seen = self._seen.get(key)
        if name not in self.leader:
            shares = seen is not None and seen[0] is x
            self.leader[name] = seen[1] if shares else name
        leader = self.leader[name]
        if leader != name:
            return
        self._seen[key] = (x, name)
        rows = adapter.input_rows(module, x.detach(), self._token_mask).to(self.dtype)
        if not torch.isfinite(rows).all():
            raise NonFiniteActivationError(
                f"The input of layer {name!r} has NaN or inf on verified samples; the model "
                f"or the data is broken, and no clean space can be built from it."
            )
        if name not in self.grams:
            d = rows.shape[1]
            self.grams[name] = torch.zeros(self.num_slots, d, d, dtype=self.dtype, device=rows.device)
            self.rows[name] = torch.zeros(self.num_slots, dtype=torch.long, device=rows.device)
        self.grams[name][self._slot].addmm_(rows.t(), rows)
        self.rows[name][self._slot] += rows.shape[0]

    def groups(self) -> dict[str, list[str]]:
        """leader -> every layer sharing its Gram, in model order."""
        out: dict[str, list[str]] = {}
        for name in self.targets:
            if name in self.leader:
                out.setdefault(self.leader[name], []).append(name)
        return out

    def never_called(self) -> list[str]:
        return [name for name in self.targets if name not in self.leader]

    def all_reduce(self) -> None:
        """Sum Grams and row counts over processes: one collective per distinct layer input, one for all counts."""
        names = sorted(self.grams)
        for name in names:
            self.grams[name] = sum_across_processes(self.grams[name])
        if names:
            device = self.rows[names[0]].device
            counts = sum_across_processes(torch.stack([self.rows[name].to(device) for name in names]))
            for name, count in zip(names, counts, strict=True):
                self.rows[name] = count.to(self.rows[name].device)
