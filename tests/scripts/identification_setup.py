"""Data, model and config shared by tests/test_identification.py and its distributed script."""

from __future__ import annotations

import datasets
import numpy as np
import torch

from hf_repair import RepairConfig
from testbed.experiments import SmallCNN
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_fashion_mnist

NUM_TRAIN = 3000
NUM_VERIFIED = 1000


def fashion_subsets(num_train: int = NUM_TRAIN, num_verified: int = NUM_VERIFIED) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Disjoint, seeded training and verified subsets of the Fashion-MNIST training split (clean labels)."""
    full = load_fashion_mnist("train")
    order = np.random.default_rng(0).permutation(len(full))
    return full.select(order[:num_train]), full.select(order[num_train : num_train + num_verified])


def distributed_case() -> tuple[torch.nn.Module, datasets.Dataset, datasets.Dataset, RepairConfig]:
    """Odd sizes, so shards and folds are uneven; the head (closed form, exact) and the hidden layer
    before it (autograd, K-FAC with the expected Fisher), the probe and the refit: every score but the projection."""
    train, verified = fashion_subsets(301, 151)
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    config = RepairConfig(score="combined", combine_scores=["probe", "influence", "refit", "loss"], influence_depth=2,
                          batch_size=16, repair_disable_tqdm=True)
    return model, corrupt_dataset(train, "symmetric", 0.4, seed=0), verified, config
