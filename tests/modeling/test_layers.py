import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_repair.modeling.layers import adapter_for
from hf_repair.projection.clean_space import CleanSpace


def _random_projection(d: int) -> torch.Tensor:
    x = torch.randn(3 * d, d, dtype=torch.float64)
    return CleanSpace.from_gram(x.t() @ x, 3 * d).projection(10.0)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Conv2d(2, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
    ],
)
def test_conv_update_equals_projecting_unfolded_inputs(conv):
    conv = conv.double()
    adapter = adapter_for(conv)
    x = torch.randn(2, conv.in_channels, 9, 8, dtype=torch.float64)
    m = _random_projection(adapter.input_dim(conv))

    rows = adapter.input_rows(conv, x, None)  # (B * L, d)
    expected = (rows @ m) @ conv.weight.reshape(conv.out_channels, -1).t() + conv.bias  # project patches, then apply W
    with torch.no_grad():
        conv.weight.copy_(adapter.projected_weight(conv.weight, m))
        out = conv(x)  # (B, C_out, H', W')
    assert out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).shape == expected.shape
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), expected)


def test_unfolded_rows_reproduce_the_convolution():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    rows = adapter_for(conv).input_rows(conv, x, None)
    out = rows @ conv.weight.reshape(4, -1).t() + conv.bias
    torch.testing.assert_close(out, conv(x).permute(0, 2, 3, 1).reshape(-1, 4))


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), Conv1D(4, 6)])
def test_linear_and_conv1d_updates_act_on_the_input_side(layer):
    layer = layer.double()
    adapter = adapter_for(layer)
    x = torch.randn(5, 6, dtype=torch.float64)
    m = _random_projection(6)
    expected = layer(x @ m)  # M is symmetric: projecting inputs == projecting weights
    with torch.no_grad():
        layer.weight.copy_(adapter.projected_weight(layer.weight, m))
    torch.testing.assert_close(layer(x), expected)


def test_grouped_convolutions_have_no_adapter():
    assert adapter_for(nn.Conv2d(4, 4, 3, groups=4)) is None
    assert adapter_for(nn.Conv2d(4, 4, 3)) is not None
    assert adapter_for(nn.Embedding(4, 4)) is None
