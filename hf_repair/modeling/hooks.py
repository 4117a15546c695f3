"""Forward hooks on named layers, registered for one `with` block: the one place that reads a layer's input.

The clean-space projection reads layer inputs before the layer runs (forward pre-hooks, `GramCollector`);
identification reads inputs and outputs after it runs (forward hooks, `LayerCapture`). Both subclass
`LayerHooks`, which registers the hooks on entry, removes them on exit (also on error), and hands each
callback the tensor the layer was called on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_Hooks = TypeVar("_Hooks", bound="LayerHooks")


def layer_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The tensor a layer is called on: its first positional argument, else its first tensor keyword argument."""
    if args:
        return args[0]
    return next(value for value in kwargs.values() if torch.is_tensor(value))


class LayerHooks:
    """Hooks on `layers` (name -> module) while the `with` block runs.

    Subclasses set `reads_output` and override `on_input(name, module, x)` (a pre-hook, before the layer
    runs) or `on_output(name, module, x, output)` (after it runs; a returned tensor replaces the output).
    """

    reads_output: bool = False

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self._handles: list[RemovableHandle] = []

    def __enter__(self: _Hooks) -> _Hooks:
        for name, module in self.layers.items():
            if self.reads_output:
                handle = module.register_forward_hook(self._output_hook(name), with_kwargs=True)
            else:
                handle = module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True)
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        raise NotImplementedError

    def on_output(self, name: str, module: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor | None:
        raise NotImplementedError

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.on_input(name, module, layer_input(args, kwargs))

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
            return self.on_output(name, module, layer_input(args, kwargs), output)

        return hook


class LayerCapture(LayerHooks):
    """Keeps each layer's input and output of the current forward pass.

    With `track_grad=True` the forward must run with grad enabled: an output that does not require
    grad (frozen weights) is replaced by a detached leaf that does, so `torch.autograd.grad` can
    reach it without building the graph of the layers below. A layer that runs twice in one forward
    (shared weights) has no single per-sample outer product: `strict` makes that an error, otherwise
    only its first call is kept and its name is added to `repeated`.
    """

    reads_output = True

    def __init__(self, layers: Mapping[str, nn.Module], track_grad: bool, strict: bool = True) -> None:
        super().__init__(layers)
        self.track_grad = track_grad
        self.strict = strict
        self.repeated: set[str] = set()
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, Any] = {}
        self.order: list[str] = []

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.clear()

    def clear(self) -> None:
        """Forget the previous forward pass (call before each one)."""
        self.inputs.clear()
        self.outputs.clear()
        self.order.clear()

    def on_output(self, name: str, module: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor | None:
        if name in self.inputs:
            if self.strict:
                raise ValueError(
                    f"Layer {name!r} ran twice in one forward pass (shared weights); its per-sample gradient "
                    f"is not a single outer product. Leave it out of influence_modules."
                )
            self.repeated.add(name)
            return None
        self.inputs[name] = x.detach()
        self.order.append(name)
        if self.track_grad and torch.is_tensor(output) and not output.requires_grad:
            output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            return output
        self.outputs[name] = output
        return None
