import pytest
import torch
from torch import nn

from hf_repair.modeling.layers import adapter_for
from hf_repair.projection.capture import GramCollector
from hf_repair.projection.clean_space import CleanSpace


def _gram_of(layer: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    targets = {"layer": (layer, adapter_for(layer))}
    collector = GramCollector(targets, num_slots=1)
    with collector, torch.no_grad():
        for x in batches:
            collector.begin_batch(0)
            layer(x)
    return collector.grams["layer"][0], int(collector.rows["layer"][0])


def test_streamed_gram_eigenbasis_equals_svd_of_stacked_activations():
    layer = nn.Linear(6, 3)
    batches = [torch.randn(7, 5, 6) for _ in range(4)]  # (batch, tokens, features), streamed
    gram, rows = _gram_of(layer, batches)
    space = CleanSpace.from_gram(gram, rows)

    stacked = torch.cat([b.reshape(-1, 6) for b in batches]).double().t()  # R: d x n
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    assert rows == 4 * 7 * 5
    torch.testing.assert_close(space.energies, s**2, rtol=1e-9, atol=1e-9)
    # Eigenvectors are defined up to sign: compare the projectors onto each direction.
    for i in range(6):
        torch.testing.assert_close(torch.outer(space.basis[:, i], space.basis[:, i]), torch.outer(u[:, i], u[:, i]))


def test_importance_limits():
    space = CleanSpace.from_gram(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)), 10)
    share = space.energies / space.energies.sum()
    torch.testing.assert_close(space.importance(1.0), share)  # alpha = 1: collapse to the energy share
    assert torch.all(space.importance(1e12) > 1 - 1e-9)  # alpha -> infinity: every direction kept
    torch.testing.assert_close(space.projection(1e12), torch.eye(4, dtype=torch.float64), atol=1e-9, rtol=0)
    lam = space.importance(100.0)
    assert torch.all(lam[:-1] >= lam[1:])  # stronger directions are kept more


def test_rank_deficient_space_removes_unused_directions():
    x = torch.zeros(50, 4)
    x[:, :2] = torch.randn(50, 2)
    gram = (x.t() @ x).double()
    space = CleanSpace.from_gram(gram, 50)
    assert space.rank() == 2
    m = space.projection(1e12)
    probe = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert m @ probe == pytest.approx(torch.zeros(4, dtype=torch.float64), abs=1e-9)


def test_padded_tokens_are_masked():
    layer = nn.Linear(3, 2)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    collector = GramCollector({"layer": (layer, adapter_for(layer))}, num_slots=1)
    with collector, torch.no_grad():
        collector.begin_batch(0, mask)
        layer(x)
    kept = x[mask.bool()].double()
    assert int(collector.rows["layer"][0]) == 5
    torch.testing.assert_close(collector.grams["layer"][0], kept.t() @ kept)
