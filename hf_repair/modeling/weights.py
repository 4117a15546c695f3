"""Reading, writing and restoring the repaired weights, bit for bit.

Every repair starts with a snapshot on CPU -- the target layers' weights for the projection
(`WeightSnapshot`), every parameter and buffer for a fine-tune (`ModelSnapshot`) -- and restores
it on any failure, so a model is never left half-repaired. Both offer what `RepairResult` needs
afterwards: `restore` (undo), `original(layer)`, `originals_swapped_in` (score the model as
trained, e.g. for the report) and `missing_from(model)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .layers import LayerAdapter
from .sharding import WeightAccess


class WeightSnapshot:
    """Exact copies of the target layers' weights, taken before anything is changed."""

    def __init__(self, modules: dict[str, nn.Module], access: WeightAccess | None = None) -> None:
        self.modules = modules
        # How to reach each full weight when training left it sharded (FSDP, ZeRO-3); see sharding.py.
        self.access = access or WeightAccess()
        self._original = {name: self._read(module) for name, module in modules.items()}

    @classmethod
    def of_targets(cls, targets: dict[str, tuple[nn.Module, LayerAdapter]],
                   access: WeightAccess | None = None) -> WeightSnapshot:
        """The snapshot of the weights the projection writes: each layer's own, a LoRA layer's `lora_A`."""
        return cls({name: adapter.weight_module(module) for name, (module, adapter) in targets.items()}, access)

    def _read(self, module: nn.Module) -> torch.Tensor:
        with self.access.full_weight(module) as weight:
            return weight.detach().to("cpu", copy=True)

    def original(self, name: str) -> torch.Tensor:
        return self._original[name]

    @torch.no_grad()
    def write(self, name: str, weight: torch.Tensor) -> None:
        with self.access.full_weight(self.modules[name], writeback=True) as target:
            target.copy_(weight.to(device=target.device, dtype=target.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for name in self.modules:
            self.write(name, self._original[name])

    @contextlib.contextmanager
    def originals_swapped_in(self) -> Iterator[None]:
        """The weights as they were before the repair during the block; the repaired ones back, bit for bit, after."""
        repaired = {name: self._read(module) for name, module in self.modules.items()}
        try:
            self.restore()
            yield
        finally:
            for name, weight in repaired.items():
                self.write(name, weight)

    def missing_from(self, model: nn.Module) -> list[str]:
        """The snapshotted layers that are not modules of `model` (empty: it is the model that was repaired)."""
        modules = {id(m) for m in model.modules()}
        return [name for name, module in self.modules.items() if id(module) not in modules]

    def is_unchanged(self) -> bool:
        # A list, not a short-circuiting generator: with sharded weights every read is a collective.
        return all([torch.equal(self._read(m), self._original[n]) for n, m in self.modules.items()])

    def relative_change(self, name: str) -> float:
        """||W_now - W_before||_F / ||W_before||_F."""
        before = self._original[name].double()
        now = self._read(self.modules[name]).double()
        denom = before.norm()
        return float((now - before).norm() / denom) if denom > 0 else 0.0


class ModelSnapshot:
    """Exact CPU copies of every parameter and buffer, restorable in place.

    Unlike `WeightSnapshot` (target layers' weights only), a fine-tune moves every trainable
    parameter and updates buffers such as BatchNorm running statistics, so all of them are kept.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state = self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def original(self, name: str) -> torch.Tensor:
        """The weight of layer `name` before the repair."""
        return self._state[f"{name}.weight"]

    @torch.no_grad()
    def restore(self) -> None:
        # load_state_dict copies into the existing tensors, so optimizers and hooks keep their references.
        self.model.load_state_dict(self._state)

    @contextlib.contextmanager
    def originals_swapped_in(self) -> Iterator[None]:
        """The model as it was before the repair during the block; the repaired state back, bit for bit, after."""
        repaired = self._read()
        try:
            self.restore()
            yield
        finally:
            with torch.no_grad():
                self.model.load_state_dict(repaired)

    def missing_from(self, model: nn.Module) -> list[str]:
        """["the repaired model"] unless `model` is (or contains) the model this snapshot was taken of."""
        return [] if any(m is self.model for m in model.modules()) else ["the repaired model"]

    def is_unchanged(self) -> bool:
        return all(torch.equal(v.detach().cpu(), self._state[k]) for k, v in self.model.state_dict().items())
