"""Models fine-tuned with peft's LoRA: which of their modules are layers to repair, and how a LoRA layer is projected.

A LoRA layer computes `W0 x + s B A x`: `W0` (its `base_layer`) is frozen and is not in the adapter
`save_pretrained` writes; `A` (r x in) and `B` (out x r) are. The projection W <- W M acts on the
input side, and `(W0 + s B A) M` is no longer `W0` plus a rank-r update, but `W0 + s B (A M)` is:
hf_repair projects `A <- A M` (`LoraAdapter`), so the repaired model is still a LoRA of the same rank
that saves and reloads as a normal peft adapter, and the frozen base weights never change. The
clean space is the same one the base layer would get: `A` reads the very input the LoRA layer is
called on (dropout is the identity in eval mode). BENCHMARKS.md ("LoRA") compares this with
projecting the merged weight.

A module peft fine-tunes whole (`modules_to_save`, usually the classification head, wrapped in a
`ModulesToSaveWrapper`) is saved with the adapter: the layers of its active copy are ordinary layers,
named as in the bare model. Every other layer of a PeftModel is a frozen base layer and is never a target.

peft is optional: nothing here imports it unless it is already imported (a PeftModel cannot exist
otherwise), so hf_repair works without it installed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import LayerAdapter, adapter_for

SUPPORTED = "LoRA (peft LoraConfig, without use_dora) on nn.Linear, transformers Conv1D and nn.Conv2d layers, one active adapter"


def _peft() -> Any | None:
    """The peft module if a peft model can exist in this process (peft was imported), else None."""
    if sys.modules.get("peft") is None:
        return None
    import peft.tuners.lora
    import peft.tuners.tuners_utils
    import peft.utils.other

    return peft


class LoraAdapter(LayerAdapter):
    """A LoRA layer, projected on its adapter's input side: `A <- A M` (the weight written is `lora_A`'s).

    Reads input rows as `lora_A` does (a LoRA `nn.Conv2d`'s `lora_A` is a convolution with the base kernel,
    stride and padding, its weight (r, C_in*kh*kw) on unfolded patches), so it delegates to the adapter of
    `lora_A` itself. `kind` is "lora_" + that adapter's kind, so a saved repair names what it projected.
    """

    def __init__(self, inner: LayerAdapter, layout: str) -> None:
        self.inner = inner
        self.kind = f"lora_{inner.kind}"
        self.layout = layout  # the base layer's: a LoRA on GPT-2's Conv1D has an nn.Linear lora_A

    def weight_module(self, module: nn.Module) -> nn.Module:
        return module.lora_A[module.active_adapters[0]]

    def input_dim(self, module: nn.Module) -> int:
        return self.inner.input_dim(self.weight_module(module))

    def row_signature(self, module: nn.Module) -> Hashable:
        # the rows are those of a plain layer of the inner kind: q, k and v share a space LoRA or not
        return self.inner.row_signature(self.weight_module(module))

    def input_rows(self, module: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        return self.inner.input_rows(self.weight_module(module), x, token_mask)

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return self.inner.as_matrix(weight)

    def from_matrix(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.inner.from_matrix(matrix, like)

    def effective_weight(self, module: nn.Module) -> torch.Tensor:
        return module.get_base_layer().weight + module.get_delta_weight(module.active_adapters[0])


@dataclass
class PeftLayers:
    """Which modules of a PeftModel are layers to repair: its LoRA layers and its modules_to_save copies."""

    trainable: dict[int, LayerAdapter] = field(default_factory=dict)  # id(module) -> adapter
    inside: set[int] = field(default_factory=set)  # parts of those (base_layer, lora_A, original_module, ...)
    kept: list[str] = field(default_factory=list)  # LoRA layers of other types, left as trained


def peft_layers(model: nn.Module) -> PeftLayers | None:
    """The repairable layers of a PeftModel, None for any other model; `ValueError` if its adapter is unsupported.

    Checked before anything reads or changes the model, and naming what is supported.
    """
    peft = _peft()
    if peft is None:
        return None
    tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer
    lora_layer = peft.tuners.lora.LoraLayer
    wrapper = peft.utils.other.ModulesToSaveWrapper
    _check_configs(model)
    layers = PeftLayers()
    found = False
    for name, module in model.named_modules():
        if isinstance(module, tuner_layer):
            found = True
            adapter = _lora_adapter(name, module, lora_layer)
            if adapter is None:
                layers.kept.append(name)
            else:
                layers.trainable[id(module)] = adapter
            layers.inside.update(id(m) for m in module.modules() if m is not module)
        elif isinstance(module, wrapper):
            found = True
            active = _single_active(name, module)
            copy = module.modules_to_save[active]  # trained whole and saved: each of its layers is a layer
            layers.inside.update(id(m) for m in module.modules() if m is not module)
            for part in copy.modules():
                adapter = adapter_for(part)
                if adapter is not None:
                    layers.trainable[id(part)] = adapter
                    layers.inside.discard(id(part))
    return layers if found else None


def has_lora_factors(model: nn.Module | None) -> bool:
    """Whether `model` holds peft LoRA layers, whose trained weights are factors A and B: the mean of several runs'
    factors is not the mean of their products B A."""
    peft = _peft()
    return peft is not None and model is not None and any(
        isinstance(module, peft.tuners.lora.LoraLayer) for module in model.modules())


def _check_configs(model: nn.Module) -> None:
    """Adapters without tuner layers (prompt tuning, prefix tuning) show only in the PeftModel's configs."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    kinds = {name: getattr(config.peft_type, "value", config.peft_type) for name, config in configs.items()}
    other = {name: kind for name, kind in kinds.items() if kind != "LORA"}
    if other:
        raise ValueError(
            f"{type(model).__name__} has peft adapters of type {other}; hf_repair repairs {SUPPORTED}. Merge the "
            f"adapter into the model (model.merge_and_unload()) to repair the merged weights instead."
        )


def _single_active(name: str, module: nn.Module) -> str:
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(
            f"{name} has {len(active)} active peft adapters ({active}); hf_repair repairs one: choose it with "
            f"model.set_adapter(name). Supported: {SUPPORTED}."
        )
    return active[0]


def _lora_adapter(name: str, module: nn.Module, lora_layer: type) -> LayerAdapter | None:
    """The adapter of a LoRA layer, None for LoRA on a layer hf_repair does not project (an embedding)."""
    if not isinstance(module, lora_layer):
        raise ValueError(
            f"{name} is a {type(module).__module__}.{type(module).__name__} peft layer; hf_repair repairs {SUPPORTED}. "
            f"Merge the adapter (model.merge_and_unload()) to repair the merged weights instead."
        )
    active = _single_active(name, module)
    if module.use_dora.get(active, False) or active in getattr(module, "lora_variant", {}):
        raise ValueError(
            f"{name} is a LoRA variant ({'DoRA' if module.use_dora.get(active) else type(module.lora_variant[active]).__name__}); "
            f"its update is not B A alone, so A <- A M does not project it. hf_repair repairs {SUPPORTED}; merge the "
            f"adapter (model.merge_and_unload()) to repair the merged weights instead."
        )
    if module.merged:
        raise ValueError(f"{name} has its LoRA merged into the base weight; call model.unmerge_adapter() first.")
    if active not in module.lora_A:
        return None  # LoRA on an embedding keeps its weights in lora_embedding_A
    inner, base = adapter_for(module.lora_A[active]), adapter_for(module.get_base_layer())
    return LoraAdapter(inner, base.layout) if inner is not None and base is not None else None


class FrozenBase:
    """Fingerprints of the tensors of a PeftModel that its adapter does not save (the frozen base).

    Projection, head refit and the fine-tunes change only adapter weights, but a repair can still reach the
    base: BatchNorm statistics updated while fine-tuning, or `method="auto"` loading checkpoints of another
    run. Then `save_pretrained` of the adapter would silently lose part of the repair; `changed()` tells.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._fingerprints = self._read()

    @classmethod
    def of(cls, model: nn.Module) -> FrozenBase | None:
        """The check for a PeftModel, None for any other model and for sharded parameters (FSDP2, ZeRO-3: a
        shard is not the weight save_pretrained gathers)."""
        peft = _peft()
        if peft is None or not isinstance(model, peft.PeftModel) or _sharded(model):
            return None
        return cls(model)

    def _read(self) -> dict[str, str]:
        from peft.utils import get_peft_model_state_dict

        saved = {tensor.data_ptr() for tensor in get_peft_model_state_dict(self.model).values()}
        return {key: _fingerprint(value) for key, value in self.model.state_dict().items()
                if value.data_ptr() not in saved}

    def changed(self) -> list[str]:
        """The base tensors (state_dict keys) whose bits differ from when the check was made."""
        now = self._read()
        return [key for key, digest in self._fingerprints.items() if now.get(key) != digest]


def _sharded(model: nn.Module) -> bool:
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _fingerprint(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else "empty"


ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # what a PeftModel's save_pretrained writes


def is_adapter_checkpoint(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in ADAPTER_WEIGHTS_NAMES)


def read_adapter_checkpoint(folder: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state of `model` with the adapter saved in `folder` (a `Trainer` checkpoint of a PeftModel), on CPU.

    peft maps the saved names onto the model's; the model's own adapter weights are put back afterwards.
    """
    peft = _peft()
    if peft is None or not isinstance(model, peft.PeftModel):
        raise ValueError(f"{folder} holds a peft adapter, but the model is a {type(model).__name__}: load the final "
                         f"model as PeftModel.from_pretrained(base, final_checkpoint) to read its trajectory.")
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    own = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
    try:
        set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
        return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    finally:
        set_peft_model_state_dict(model, own)
