"""The model, verified split and config shared by the distributed script and its single-process reference."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_repair import RepairConfig

NUM_VERIFIED = 61  # odd, so folds and shards are uneven and the prepared loader pads its last batch
CONFIG = RepairConfig(alphas=[1.0, 10.0, 1e3], batch_size=8, min_improvement=-1.0, significance_test="none", repair_disable_tqdm=True)


def make_model() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    return ViTForImageClassification(config)


def verified_split() -> datasets.Dataset:
    rng = np.random.default_rng(0)
    labels = np.arange(NUM_VERIFIED) % 3
    x = rng.normal(size=(NUM_VERIFIED, 1, 8, 8)).astype(np.float32) + labels[:, None, None, None]
    return datasets.Dataset.from_dict({"pixel_values": x, "labels": labels}).with_format("torch")
