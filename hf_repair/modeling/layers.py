"""Layer adapters: one small class per layer type, the only place that knows its weight layout.

An adapter turns a layer's input into rows x (one per position or patch, dimension d) whose Gram
sum x x^T is the layer's clean activation statistic, and applies the input-side update W <- W M
to the layer's weight in the layout that layer stores it.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class LayerAdapter:
    """How to read input rows from, and project the weight of, one kind of layer."""

    kind: str = ""
    layout: str = ""  # how the layer's effective weight is stored: "linear" (out, in), "conv1d" (in, out), "conv2d"

    def weight_module(self, module: nn.Module) -> nn.Module:
        """The module whose `.weight` the projection reads and writes: the layer itself (a LoRA layer: its `lora_A`)."""
        return module

    def effective_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer applies, in its `layout` (a LoRA layer: base weight plus its low-rank update)."""
        return module.weight

    def input_dim(self, module: nn.Module) -> int:
        raise NotImplementedError

    def row_signature(self, module: nn.Module) -> Hashable:
        """Two layers fed the same tensor share one clean space iff their signatures are equal."""
        return (self.kind, self.input_dim(module))

    def input_rows(self, module: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """(n, d) rows of the layer input; padded tokens (token_mask == 0) are dropped."""
        rows_per_position = x.reshape(-1, x.shape[-1])
        if token_mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
            keep = token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            per_token = x.shape[2:-1].numel()  # extra dims between (batch, seq) and features
            keep = keep.repeat_interleave(per_token)
            return rows_per_position[keep]
        return rows_per_position

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight (in the module's own layout) viewed as (out, d), so the update is `W @ M`."""
        return weight

    def from_matrix(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of `as_matrix`: an (out, d) matrix back in the layout of `like`."""
        return matrix

    def projected_weight(self, weight: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """`weight` updated on its input side by `projection` (d x d, symmetric)."""
        return self.from_matrix(self.as_matrix(weight) @ projection, weight)


class LinearAdapter(LayerAdapter):
    kind = layout = "linear"

    def input_dim(self, module: nn.Linear) -> int:
        return module.in_features


class Conv1DAdapter(LayerAdapter):
    """GPT-2's `Conv1D` stores its weight as (in, out): the update lands on the left, M^T W."""

    kind = layout = "conv1d"

    def input_dim(self, module: Conv1D) -> int:
        return module.weight.shape[0]

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def from_matrix(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return matrix.t()


class Conv2dAdapter(LayerAdapter):
    """A groups=1 convolution is a linear map on unfolded patches of length C_in * kh * kw."""

    kind = layout = "conv2d"

    def input_dim(self, module: nn.Conv2d) -> int:
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw

    def row_signature(self, module: nn.Conv2d) -> Hashable:
        return (self.kind, module.in_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.padding_mode)

    def input_rows(self, module: nn.Conv2d, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        # Pad exactly as the layer does (any padding_mode, "same"/"valid"), then unfold unpadded.
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(like.shape)


_LINEAR, _CONV1D, _CONV2D = LinearAdapter(), Conv1DAdapter(), Conv2dAdapter()


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a repairable layer, or None (including grouped convolutions)."""
    if isinstance(module, nn.Linear):
        return _LINEAR
    if isinstance(module, Conv1D):
        return _CONV1D
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return _CONV2D
    return None
