"""Full weights of one layer at a time, also when training left the parameters sharded.

After training with FSDP, FSDP2 or DeepSpeed ZeRO-3 every process holds only a shard of each
weight. The repair needs one layer's full weight (W M is computed on the whole matrix) and must
put the result back into the shards, so later forward passes, `trainer.save_model()` and the
optimizer all see it. A `WeightAccess` does exactly that through each library's documented API,
gathering a single layer (FSDP: a single wrapped unit) at a time to bound memory:

- no sharding, DDP, ZeRO-1/2: the parameter is the full weight; read and write it in place;
- FSDP (1): `FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True)`
  on the FSDP unit that owns the layer;
- FSDP2 (`fully_shard`): `DTensor.full_tensor()` to read, `distribute_tensor` + an in-place copy
  into the sharded parameter to write back;
- DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters([weight], modifier_rank=0)`, which
  re-partitions rank 0's values on exit (every process computes the same values anyway).

Every access is a collective in the sharded cases: all processes must access the same layers in
the same order, which the repair does (same targets, same iteration order on every process).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


class WeightAccess:
    """Plain parameters (single process, DDP, ZeRO-1/2): `module.weight` is the full weight."""

    kind = "plain"

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    @contextmanager
    def full_weight(self, module: nn.Module, writeback: bool = False) -> Iterator[torch.Tensor]:
        """The full weight of `module`; in-place changes persist when `writeback` is True."""
        yield module.weight


class FSDPWeightAccess(WeightAccess):
    """FSDP (1): unshard the owning FSDP unit only (`recurse=False`), write back into its shard."""

    kind = "fsdp"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        self._fsdp = FSDP
        self._owner: dict[int, nn.Module] = {}  # id(module) -> the innermost FSDP unit holding it
        roots: list[nn.Module] = []

        def visit(module: nn.Module, unit: nn.Module | None) -> None:
            if isinstance(module, FSDP):
                if unit is None:
                    roots.append(module)
                unit = module
            if unit is not None:
                self._owner[id(module)] = unit
            for child in module.children():
                visit(child, unit)

        visit(model, None)
        # FSDP initialises lazily from the root unit; unsharding an inner unit first would make that
        # unit a root. Summoning each root's own parameters once runs the initialisation (a no-op
        # after training, which already did).
        for root in roots:
            with FSDP.summon_full_params(root, recurse=False, writeback=False):
                pass

    @contextmanager
    def full_weight(self, module: nn.Module, writeback: bool = False) -> Iterator[torch.Tensor]:
        unit = self._owner.get(id(module))
        if unit is None:  # a layer outside every FSDP unit is not sharded
            yield module.weight
            return
        with self._fsdp.summon_full_params(unit, recurse=False, writeback=writeback):
            yield module.weight


class FSDP2WeightAccess(WeightAccess):
    """FSDP2: weights are `DTensor`s; gather with `full_tensor`, scatter back with `distribute_tensor`."""

    kind = "fsdp2"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from torch.distributed.fsdp import FSDPModule

        self._fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]

    @contextmanager
    def full_weight(self, module: nn.Module, writeback: bool = False) -> Iterator[torch.Tensor]:
        from torch.distributed.tensor import DTensor, distribute_tensor

        # The root module keeps its parameters unsharded after a forward pass (FSDP2 skips the
        # reshard it would undo for backward). Writes to an unsharded parameter are dropped at the
        # next reshard, so register the sharded parameters first: a no-op when already sharded.
        for fsdp_module in self._fsdp_modules:
            fsdp_module.reshard()
        param = module.weight
        if not isinstance(param, DTensor):  # not managed by fully_shard
            yield param
            return
        with torch.no_grad():
            full = param.full_tensor()
        yield full
        if writeback:
            with torch.no_grad():
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements))


class ZeRO3WeightAccess(WeightAccess):
    """DeepSpeed ZeRO-3: gather one parameter; rank 0's values are re-partitioned on exit."""

    kind = "deepspeed_zero3"

    @contextmanager
    def full_weight(self, module: nn.Module, writeback: bool = False) -> Iterator[torch.Tensor]:
        import deepspeed  # only reachable when the model was prepared by DeepSpeed

        param = module.weight
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if writeback else None):
            yield param


def weight_access_for(model: nn.Module) -> WeightAccess:
    """The `WeightAccess` matching how `model`'s parameters are laid out (detected, not configured)."""
    access = WeightAccess(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if any(isinstance(m, FSDP) for m in model.modules()):
            access = FSDPWeightAccess(model)
        elif any(isinstance(m, FSDPModule) for m in model.modules()):
            access = FSDP2WeightAccess(model)
    if access.kind == "plain" and any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 partitioned
        access = ZeRO3WeightAccess(model)
    if access.kind != "plain":
        logger.info("Weights are sharded (%s): each target layer is gathered and written back in turn.", access.kind)
    return access
