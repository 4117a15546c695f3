"""Choosing which layers to repair, with peft's `target_modules` semantics.

- a list matches exact module names or dotted suffixes (`"query"` matches `"...attention.query"`);
- a string is a regex matched with `re.fullmatch` against the full name;
- `"all-linear"` is every `nn.Linear` and `transformers` `Conv1D`; `"all"` adds `nn.Conv2d`.

Wrapper prefixes (`torch.compile`'s `_orig_mod.`, FSDP's `_fsdp_wrapped_module.`, DDP's `module.`)
are ignored when matching, so a name that works on the bare model works on the wrapped one.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from .layers import LayerAdapter, adapter_for

logger = logging.getLogger(__name__)

_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module")


def canonical_name(name: str) -> str:
    """The module name with wrapper components removed (`_orig_mod.fc` -> `fc`)."""
    parts = name.split(".")
    # `module` is also a plausible user name deep in a model; only strip it as a leading wrapper.
    kept = []
    leading = True
    for part in parts:
        if part in _WRAPPER_PARTS and (part != "module" or leading):
            continue
        leading = False
        kept.append(part)
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


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
) -> dict[str, tuple[nn.Module, LayerAdapter]]:
    """Map canonical module name -> (module, adapter) for every layer to repair.

    Raises `ValueError` listing candidate names when nothing matches, so a typo fails loudly.
    Grouped/depthwise convolutions and layers whose weight is tied to another module are skipped
    with a warning that names them: projecting a tied weight would silently change the other layer.
    """
    include_conv = target_modules == "all"
    keyword = target_modules in ("all", "all-linear")
    tied = _tied_parameters(model)

    selected: dict[str, tuple[nn.Module, LayerAdapter]] = {}
    candidates: list[str] = []
    skipped_grouped: list[str] = []
    skipped_tied: list[str] = []
    for raw_name, module in model.named_modules():
        name = canonical_name(raw_name)
        adapter = adapter_for(module)
        if adapter is None:
            if isinstance(module, nn.Conv2d) and (
                target_modules == "all" or (not keyword and _matches(name, target_modules))
            ):
                skipped_grouped.append(name)
            continue
        candidates.append(name)
        if keyword:
            if adapter.kind == "conv2d" and not include_conv:
                continue
        elif not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if id(module.weight) in tied:
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
    if not selected:
        shown = _candidate_summary(candidates)
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"repairable layer in {type(model).__name__}. Repairable layers (nn.Linear, Conv1D, "
            f"nn.Conv2d with groups=1): {shown}"
        )
    return selected


def _candidate_summary(candidates: list[str], limit: int = 40) -> str:
    if not candidates:
        return "none (the model has no nn.Linear, Conv1D or nn.Conv2d layer)"
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    listed = candidates if len(candidates) <= limit else candidates[:limit] + [f"... ({len(candidates)} in all)"]
    return f"{listed}; distinct suffixes: {suffixes}"
