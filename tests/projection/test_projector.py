from dataclasses import replace

import torch
from torch import nn

from hf_repair.modeling.layers import adapter_for
from hf_repair.modeling.weights import WeightSnapshot
from hf_repair.projection.clean_space import CleanSpace
from hf_repair.projection.projector import Projector
from hf_repair.projection.search import _selection_dtype


def _project(layer: nn.Linear, space: CleanSpace, alpha: float) -> torch.Tensor:
    targets = {"fc": (layer, adapter_for(layer))}
    snapshot = WeightSnapshot({"fc": layer})
    Projector(targets, snapshot, {"fc": ["fc"]}, {"fc": space}).apply(alpha)
    weight = layer.weight.detach().clone()
    snapshot.restore()
    return weight


def test_float32_products_give_the_float64_projection_to_float32_precision():
    torch.manual_seed(0)
    layer = nn.Linear(40, 6)
    rows = torch.randn(25, 40, dtype=torch.float64) * torch.linspace(2.0, 0.01, 40, dtype=torch.float64)
    space = CleanSpace.from_rows(rows)  # thin: 40 x 25
    single = replace(space, basis=space.basis.float())
    for alpha in (1.0, 1e3, 1e7):
        exact = _project(layer, space, alpha)
        torch.testing.assert_close(_project(layer, single, alpha), exact, rtol=1e-5, atol=1e-6)
        expected = (layer.weight.detach().double() @ space.projection(alpha)).float()
        torch.testing.assert_close(exact, expected)


def test_selection_runs_in_float64_for_a_float64_model():
    layers = {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)}
    targets = {name: (layer, adapter_for(layer)) for name, layer in layers.items()}
    assert _selection_dtype(WeightSnapshot(layers), targets) == torch.float32
    layers["b"].double()
    assert _selection_dtype(WeightSnapshot(layers), targets) == torch.float64
