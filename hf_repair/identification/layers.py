"""Which layers identification reads, found by one hooked forward pass on a verified batch.

- the influence layers: the classification head (the layer whose output is the logits, with closed-form
  gradients) and the `influence_depth - 1` layers that run before it, or `influence_modules`;
- the probe's input layer: the first layer of the classifier MLP, found by walking back from the head
  while layers see one input row per sample, or `probe_module`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import RepairConfig
from ..data import VerifiedSplit
from ..evaluation import ForwardFn
from ..modeling.hooks import LayerCapture
from ..modeling.targets import find_target_modules
from .influence import TrackedLayer

logger = logging.getLogger(__name__)


@dataclass
class SelectedLayers:
    """What one probing forward pass found: the influence layers, the probe's input layer, the classes."""

    tracked: list[TrackedLayer]
    num_classes: int
    probe: tuple[str, nn.Module] | None
    probe_problem: str = ""

    @property
    def head(self) -> TrackedLayer | None:
        """The tracked layer whose output is the logits (closed-form gradients, refittable), if any."""
        return next((layer for layer in reversed(self.tracked) if layer.closed_form), None)


@dataclass
class _Trace:
    """What the hooked forward pass saw: the layers that ran once, in order, and their shapes."""

    order: list[str]  # layers in the order they ran (shared-weight layers left out)
    heads: list[str]  # layers whose output is the logits tensor itself
    out_dims: dict[str, int]
    flat_input: dict[str, bool]  # one input row per sample: (batch, features)
    num_classes: int

    @property
    def head(self) -> str | None:
        """The classification head: the last layer whose output is the logits, else the last with C outputs
        (e.g. GPT-2: the score layer runs on every token and the logits are pooled afterwards)."""
        if self.heads:
            return self.heads[-1]
        matching = [name for name in self.order if self.out_dims[name] == self.num_classes]
        return matching[-1] if matching else None


def select_layers(model: nn.Module, split: VerifiedSplit, config: RepairConfig,
                  forward_fn: ForwardFn) -> SelectedLayers:
    """Run one verified batch with hooks on every supported layer; find the head, the layers before it,
    and the first layer of the classifier MLP (whose input the probe reads)."""
    try:
        candidates = find_target_modules(model, "all")
        chosen = candidates if config.influence_modules is None else find_target_modules(
            model, config.influence_modules)
    except ValueError as err:
        raise ValueError(
            f"No layer to compute per-sample gradients for: {err} Set influence_modules to nn.Linear, Conv1D or "
            f"nn.Conv2d layers of the model."
        ) from err
    trace = _trace(model, split, {name: module for name, (module, _) in candidates.items()}, forward_fn)
    tracked = []
    for name in _influence_layer_names(trace, config, list(chosen)):
        module, adapter = candidates[name]
        tracked.append(TrackedLayer(name=name, module=module, adapter=adapter, closed_form=name in trace.heads))
    logger.info("Influence layers: %s", ", ".join(
        f"{layer.name} ({'closed form' if layer.closed_form else 'autograd'})" for layer in tracked))
    probe, problem = _probe_layer_name(trace, config)
    if probe is not None:
        logger.info("Probe features: the input of %s", probe)
    return SelectedLayers(tracked=tracked, num_classes=trace.num_classes,
                          probe=(probe, candidates[probe][0]) if probe is not None else None, probe_problem=problem)


def _trace(model: nn.Module, split: VerifiedSplit, modules: dict[str, nn.Module], forward_fn: ForwardFn) -> _Trace:
    batch = next(iter(split.batches()))
    with LayerCapture(modules, track_grad=False, strict=False) as capture:
        with torch.no_grad():
            logits = forward_fn(model, batch.inputs)
        if logits.dim() != 2:
            raise ValueError(
                f"The model returns logits of shape {tuple(logits.shape)}; identification scores sequence "
                f"classifiers with (batch, num_classes) logits. Pass a forward_fn that returns them."
            )
        if capture.repeated:
            logger.warning("Not tracking layers that run more than once per forward pass (shared weights): %s",
                           sorted(capture.repeated))
        order = [name for name in capture.order if name not in capture.repeated]
        return _Trace(
            order=order,
            heads=[name for name in order if capture.outputs[name] is logits],
            out_dims={name: capture.outputs[name].shape[-1] for name in order},
            flat_input={name: capture.inputs[name].dim() == 2 for name in order},
            num_classes=logits.shape[-1],
        )


def _influence_layer_names(trace: _Trace, config: RepairConfig, chosen: list[str]) -> list[str]:
    """`influence_modules` in the order they ran, or the head and the `influence_depth - 1` layers before it."""
    if config.influence_modules is not None:
        unused = [name for name in chosen if name not in trace.order]
        if unused:
            logger.warning("These influence_modules never ran in a forward pass and are ignored: %s", unused)
        names = [name for name in trace.order if name in chosen]
        if not names:
            raise ValueError(f"None of influence_modules={config.influence_modules!r} ran in the model's forward pass.")
        return names
    head = trace.head
    if head is None:
        raise ValueError(
            f"Found no layer that produces the {trace.num_classes} logits among {trace.order[-5:]} (the last layers "
            f"that ran); set influence_modules to the classification head's name."
        )
    if head not in trace.heads:
        logger.warning(
            "The output of %r is not the logits themselves (they are pooled or transformed afterwards), so its "
            "per-sample gradients come from autograd instead of the closed form.", head
        )
    position = trace.order.index(head)
    return trace.order[max(0, position - config.influence_depth + 1) : position + 1]


def _probe_layer_name(trace: _Trace, config: RepairConfig) -> tuple[str | None, str]:
    """`probe_module`, or the input of the classifier MLP: walk back from the head while layers see one row
    per sample. Returns (name, "") or (None, why there is none)."""
    if config.probe_module is not None:
        if config.probe_module not in trace.flat_input:
            raise ValueError(
                f"probe_module={config.probe_module!r} is not a supported layer that ran in the forward pass; "
                f"the last ones were {trace.order[-5:]}."
            )
        if not trace.flat_input[config.probe_module]:
            raise ValueError(f"probe_module={config.probe_module!r} sees more than one row per sample; pick a layer "
                             f"whose input is (batch, features).")
        return config.probe_module, ""
    head = trace.head
    if head is None or not trace.flat_input[head]:
        return None, "no classification layer with one input row per sample"
    position = trace.order.index(head)
    while position > 0 and trace.flat_input[trace.order[position - 1]]:
        position -= 1
    return trace.order[position], ""
