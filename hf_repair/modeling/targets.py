"""Choosing which layers to repair, with peft's `target_modules` semantics.

- a list matches exact module names or dotted suffixes (`"query"` matches `"...attention.query"`);
- a string is a regex matched with `re.fullmatch` against the full name;
- `"all-linear"` is every `nn.Linear` and `transformers` `Conv1D`; `"all"` adds `nn.Conv2d`.

Wrapper prefixes (`torch.compile`'s `_orig_mod.`, FSDP's `_fsdp_wrapped_module.`, DDP's `module.`,
a peft `PeftModel`'s `base_model.model.`) are ignored when matching, so a name that works on the bare
model works on the wrapped one.

In a PeftModel only the layers its adapter trains and saves are candidates: each LoRA layer (one layer,
never its `base_layer`, `lora_A` or `lora_B` separately; see `lora.py`) and the active copy of each
`modules_to_save` layer, under the wrapped layer's name. Its frozen base layers are never changed.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from .layers import LayerAdapter, adapter_for
from .lora import peft_layers

logger = logging.getLogger(__name__)

_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module")


def canonical_name(name: str) -> str:
    """The module name with wrapper components removed (`_orig_mod.fc` -> `fc`).

    Also peft's: a PeftModel's leading `base_model.model`, and `modules_to_save.<adapter>` (the trained copy of
    a layer peft saves whole is named as that layer: `base_model.model.classifier.modules_to_save.default` ->
    `classifier`).
    """
    parts = name.split(".")
    if "modules_to_save" in parts[:-1]:
        at = parts.index("modules_to_save")
        parts = parts[:at] + parts[at + 2:]
    # `module` is also a plausible user name deep in a model; only strip it as a leading wrapper.
    kept = []
    leading = True
    for part in parts:
        if part in _WRAPPER_PARTS and (part != "module" or leading):
            continue
        leading = False
        kept.append(part)
    if kept[:2] == ["base_model", "model"]:
        kept = kept[2:]
    return ".".join(kept)


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module owns (an output layer tied to an embedding)."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}


def named_layers(model: nn.Module) -> dict[str, tuple[nn.Module, LayerAdapter | None]]:
    """Every module by canonical name, with its adapter (None: not repairable, e.g. a frozen base layer of a
    PeftModel); the parts of a LoRA layer and the inactive copies of a modules_to_save layer are left out."""
    peft = peft_layers(model)
    layers: dict[str, tuple[nn.Module, LayerAdapter | None]] = {}
    for raw_name, module in model.named_modules():
        if peft is None:
            layers[canonical_name(raw_name)] = (module, adapter_for(module))
        elif id(module) not in peft.inside:
            name = canonical_name(raw_name)
            if name not in layers or id(module) in peft.trainable:  # the active copy, not its wrapper
                layers[name] = (module, peft.trainable.get(id(module)))
    return layers


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
) -> dict[str, tuple[nn.Module, LayerAdapter]]:
    """Map canonical module name -> (module, adapter) for every layer to repair.

    Raises `ValueError` listing candidate names when nothing matches, so a typo fails loudly, and (before
    anything changes) for a peft model whose adapter hf_repair cannot repair. Grouped/depthwise
    convolutions, layers whose weight is tied to another module and frozen base layers of a PeftModel
    are skipped with a warning that names them: projecting a tied weight would silently change the other
    layer, a frozen one a weight the adapter does not save.
    """
    include_conv = target_modules == "all"
    keyword = target_modules in ("all", "all-linear")
    tied = _tied_parameters(model)
    peft = peft_layers(model)

    selected: dict[str, tuple[nn.Module, LayerAdapter]] = {}
    candidates: list[str] = []
    skipped_grouped: list[str] = []
    skipped_tied: list[str] = []
    skipped_frozen: list[str] = []
    for raw_name, module in model.named_modules():
        name = canonical_name(raw_name)
        adapter = adapter_for(module) if peft is None else peft.trainable.get(id(module))
        if peft is not None and adapter is None:
            if id(module) not in peft.inside and adapter_for(module) is not None and not keyword and _matches(
                    name, target_modules):
                skipped_frozen.append(name)
            continue
        if adapter is None:
            if isinstance(module, nn.Conv2d) and (
                target_modules == "all" or (not keyword and _matches(name, target_modules))
            ):
                skipped_grouped.append(name)
            continue
        candidates.append(name)
        if keyword:
            if adapter.layout == "conv2d" and not include_conv:
                continue
        elif not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if id(adapter.weight_module(module).weight) in tied:
            skipped_tied.append(name)
            continue
        selected[name] = (module, adapter)

    if skipped_grouped:
        logger.warning(
            "Skipping grouped or depthwise convolutions (no single input space to project): %s",
            ", ".join(skipped_grouped),
        )
    if skipped_tied:
        logger.warning(
            "Skipping layers whose weight is tied to another module (projecting it would change "
            "that module too): %s. Untie the weights to repair them.",
            ", ".join(skipped_tied),
        )
    if peft is not None:
        _warn_peft_skips(peft.kept, skipped_frozen)
    if not selected:
        shown = _candidate_summary(candidates)
        what = ("its LoRA layers and modules_to_save layers" if peft is not None
                else "nn.Linear, Conv1D, nn.Conv2d with groups=1")
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"repairable layer in {type(model).__name__}. Repairable layers ({what}): {shown}"
        )
    return selected


def _warn_peft_skips(kept: list[str], frozen: list[str]) -> None:
    if kept:
        logger.warning("Leaving LoRA layers hf_repair does not project as trained (LoRA on embeddings, Conv1d, "
                       "Conv3d): %s", ", ".join(kept))
    if frozen:
        logger.warning(
            "Skipping frozen base layers of the PeftModel (its adapter does not save them, so a change would be "
            "lost): %s. Add them to the LoRA target_modules or modules_to_save to repair them.", ", ".join(frozen)
        )


def _candidate_summary(candidates: list[str], limit: int = 40) -> str:
    if not candidates:
        return "none (the model has no nn.Linear, Conv1D or nn.Conv2d layer)"
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    listed = candidates if len(candidates) <= limit else candidates[:limit] + [f"... ({len(candidates)} in all)"]
    return f"{listed}; distinct suffixes: {suffixes}"
