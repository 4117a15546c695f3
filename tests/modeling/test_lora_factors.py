"""The factors of a LoRA layer's mean update: B A closest to the mean of several runs' B_i A_i at the adapter's rank."""

import pytest
import torch

from hf_repair.modeling.lora import mean_update_factors


def runs(k, out, r, inner, seed=0, shared_a=False):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, *inner, generator=g) for _ in range(k)]
    if shared_a:
        a = [a[0]] * k
    b = [torch.randn(out, r, *([1] * (len(inner) - 1)), generator=g) for _ in range(k)]
    return a, b


def product(a, b):
    return b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()


def mean_update(a_runs, b_runs):
    return sum(product(a, b) for a, b in zip(a_runs, b_runs, strict=True)) / len(a_runs)


@pytest.mark.parametrize("inner", [(24,), (3, 2, 2)])  # a Linear's A, a Conv2d's (r, C, kh, kw)
def test_the_product_is_the_best_rank_r_approximation_of_the_mean_update(inner):
    a_runs, b_runs = runs(k=3, out=10, r=2, inner=inner)
    a, b = mean_update_factors(a_runs, b_runs, rank=2)
    assert a.shape == a_runs[0].shape and b.shape == b_runs[0].shape and a.dtype == a_runs[0].dtype
    mean = mean_update(a_runs, b_runs)
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young
    torch.testing.assert_close(product(a, b), best, rtol=1e-5, atol=1e-5)
    naive = product(sum(a_runs) / 3, sum(b_runs) / 3)  # the mean of the factors: farther from the mean update
    assert torch.linalg.norm(product(a, b) - mean) < torch.linalg.norm(naive - mean)


def test_a_mean_update_within_the_rank_is_kept_exactly():
    a_runs, b_runs = runs(k=3, out=10, r=2, inner=(24,), shared_a=True)  # every B_i A shares A's row space
    a, b = mean_update_factors(a_runs, b_runs, rank=2)
    mean = mean_update(a_runs, b_runs)
    torch.testing.assert_close(product(a, b), mean, rtol=1e-5, atol=1e-5)


def test_a_layer_narrower_than_the_rank_is_padded_with_zeros():
    a_runs, b_runs = runs(k=3, out=2, r=4, inner=(24,))  # out = 2 < r: the update has rank 2 at most
    a, b = mean_update_factors(a_runs, b_runs, rank=4)
    assert a.shape == (4, 24) and b.shape == (2, 4)
    mean = mean_update(a_runs, b_runs)
    torch.testing.assert_close(product(a, b), mean, rtol=1e-5, atol=1e-5)
