import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_repair.modeling.layers import adapter_for
from hf_repair.projection.capture import GramCollector, add_to_upper_gram, mirror_upper
from hf_repair.projection.clean_space import CleanSpace, symmetric_eigh


def _gram_of(layer: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    targets = {"layer": (layer, adapter_for(layer))}
    collector = GramCollector(targets, num_slots=1)
    with collector, torch.no_grad():
        for x in batches:
            collector.begin_batch(0)
            layer(x)
    return collector.gram("layer"), collector.num_rows("layer")


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
    assert collector.num_rows("layer") == 5
    torch.testing.assert_close(collector.gram("layer"), kept.t() @ kept)


def _projections_close(a: CleanSpace, b: CleanSpace) -> None:
    # A dense eigh leaves round-off energy (~1e-16 of the largest) on the directions the rows do not span,
    # which alpha scales up: at 1e7 it reaches 1e-10.
    for alpha in (1.0, 30.0, 1e4, 1e7):
        atol = 1e-10 * max(1.0, alpha / 1e6)
        torch.testing.assert_close(a.projection(alpha), b.projection(alpha), rtol=0, atol=atol)


def test_space_of_fewer_rows_than_dimensions_is_thin_and_projects_as_the_full_one():
    rows = torch.randn(12, 30, dtype=torch.float64) * torch.linspace(3.0, 0.1, 30, dtype=torch.float64)
    full = CleanSpace.from_gram(rows.t() @ rows, 12)
    thin = CleanSpace.from_rows(rows)
    assert thin.basis.shape == (30, 12) and thin.dim == 30 and thin.num_rows == 12
    torch.testing.assert_close(thin.basis.t() @ thin.basis, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(thin.energies, full.energies[:12], rtol=1e-10, atol=1e-10)
    assert thin.rank() == full.rank() == 12
    _projections_close(thin, full)


def test_thin_space_drops_the_directions_the_rows_do_not_span():
    """Repeated rows leave the dual kernel rank-deficient: the round-off directions are dropped, not blown up."""
    rows = torch.randn(4, 30, dtype=torch.float64).repeat(3, 1)  # 12 rows spanning 4 directions
    thin = CleanSpace.from_rows(rows)
    assert thin.basis.shape == (30, 4) and thin.num_rows == 12 and thin.rank() == 4
    torch.testing.assert_close(thin.basis.t() @ thin.basis, torch.eye(4, dtype=torch.float64))
    _projections_close(thin, CleanSpace.from_gram(rows.t() @ rows, 12))

    empty = CleanSpace.from_rows(torch.zeros(5, 30, dtype=torch.float64))  # no energy at all: M = 0, as the Gram's
    assert empty.basis.shape == (30, 0) and empty.rank() == 0
    assert torch.equal(empty.projection(100.0), torch.zeros(30, 30, dtype=torch.float64))


def test_space_of_more_rows_than_dimensions_comes_from_the_gram():
    rows = torch.randn(40, 30, dtype=torch.float64)
    space = CleanSpace.from_rows(rows)
    assert space.basis.shape == (30, 30)
    _projections_close(space, CleanSpace.from_gram(rows.t() @ rows, 40))


def _collect(layer: nn.Module, batches: list[tuple[int, torch.Tensor]], num_slots: int) -> GramCollector:
    collector = GramCollector({"layer": (layer, adapter_for(layer))}, num_slots=num_slots)
    with collector, torch.no_grad():
        for slot, x in batches:
            collector.begin_batch(slot)
            layer(x)
    return collector


def test_fold_spaces_from_kept_rows_equal_the_dense_ones():
    layer = nn.Linear(40, 2)
    batches = [(slot, torch.randn(5, 40)) for slot in (0, 0, 1, 1, 2, 2)]  # 30 rows < 40: kept, never a Gram
    collector = _collect(layer, batches, num_slots=3)
    assert "layer" not in collector.grams
    for fold in range(3):
        others = torch.cat([x for slot, x in batches if slot != fold]).double()
        space = collector.space("layer", without=fold)
        assert space.basis.shape == (40, 20) and space.num_rows == 20 == collector.num_rows("layer", without=fold)
        _projections_close(space, CleanSpace.from_gram(others.t() @ others, 20))
    total = torch.cat([x for _, x in batches]).double()
    _projections_close(collector.space("layer"), CleanSpace.from_gram(total.t() @ total, 30))


def test_rows_fold_into_grams_once_no_space_can_be_thin():
    layer = nn.Linear(8, 2)
    batches = [(slot, torch.randn(3, 8)) for slot in (0, 1, 1, 2, 0, 2)]  # two folds reach 8 rows at the 5th batch
    collector = _collect(layer, batches, num_slots=3)
    assert collector.grams["layer"].shape == (3, 8, 8)  # memory O(d^2) per fold from here on
    for fold in range(3):
        others = torch.cat([x for slot, x in batches if slot != fold]).double()
        torch.testing.assert_close(collector.gram("layer", without=fold), others.t() @ others)
        _projections_close(collector.space("layer", without=fold), CleanSpace.from_gram(others.t() @ others, 12))


def test_kept_rows_do_not_alias_the_layer_input():
    layer = nn.Linear(6, 2).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    collector = _collect(layer, [(0, x)], num_slots=1)
    expected = x.t() @ x
    x.zero_()  # a model may reuse its tensor in place after the layer ran
    torch.testing.assert_close(collector.gram("layer"), expected)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 450), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_upper_gram_bands_sum_the_full_product(d, n, seed):
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gram = torch.full((d, d), 7.0, dtype=torch.float64).triu()  # what earlier batches summed
    add_to_upper_gram(gram, rows)
    add_to_upper_gram(gram, 2 * rows)
    expected = 7.0 + 5 * rows.t() @ rows
    torch.testing.assert_close(mirror_upper(gram), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(mirror_upper(gram), mirror_upper(gram).t())


def test_wide_fold_grams_are_symmetric_and_equal_the_stacked_products():
    layer = nn.Linear(300, 2)  # wide enough to be summed in bands
    batches = [(slot, torch.randn(110, 300)) for slot in (0, 1, 2, 0, 1, 2)]  # 220 rows a fold: Grams
    collector = _collect(layer, batches, num_slots=3)
    assert "layer" in collector.grams
    for fold in (None, 0, 1, 2):
        others = torch.cat([x for slot, x in batches if slot != fold]).double()
        gram = collector.gram("layer", without=fold)
        assert torch.equal(gram, gram.t())
        torch.testing.assert_close(gram, others.t() @ others, rtol=1e-12, atol=1e-10)


def test_a_float32_solver_keeps_float64_energies_close_to_the_float64_ones():
    rows = torch.randn(500, 60, dtype=torch.float64) * torch.logspace(0, -3, 60, dtype=torch.float64)
    gram = rows.t() @ rows
    exact, single = CleanSpace.from_gram(gram, 500), CleanSpace.from_gram(gram, 500, solver_dtype=torch.float32)
    assert single.basis.dtype == torch.float32 and single.energies.dtype == torch.float64
    torch.testing.assert_close(single.energies, exact.energies, rtol=0, atol=1e-6 * float(exact.energies[0]))
    for alpha in (1.0, 1e3, 1e5):  # float32 precision, scaled by alpha on the weakest directions
        atol = 1e-6 + 1e-7 * alpha
        torch.testing.assert_close(single.projection(alpha).double(), exact.projection(alpha), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_cpu_eigensolver_agrees_with_torch(dtype):
    """SciPy's syevd on CPU: torch's eigenvalues, in ascending order, and a basis that rebuilds the matrix."""
    rows = torch.randn(300, 80, dtype=torch.float64) * torch.logspace(0, -2, 80, dtype=torch.float64)
    gram = (rows.t() @ rows).to(dtype)
    values, vectors = symmetric_eigh(gram)
    expected, _ = torch.linalg.eigh(gram)
    assert values.dtype == vectors.dtype == dtype and vectors.is_contiguous()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(values, expected, rtol=0, atol=tol * float(expected[-1]))
    torch.testing.assert_close((vectors * values) @ vectors.t(), gram, rtol=0, atol=tol * float(expected[-1]))
    torch.testing.assert_close(vectors.t() @ vectors, torch.eye(80, dtype=dtype), rtol=0, atol=tol * 10)
