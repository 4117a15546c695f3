"""Model, data and config shared by the head-refit and trajectory tests and their distributed script."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_repair import RepairConfig
from hf_repair.trajectory import CandidateBuilder
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_fashion_mnist


class MLP(nn.Module):
    """A 110k-parameter MLP for 28x28 images that memorises noisy labels within a few epochs."""

    def __init__(self, scale_logits: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.scale_logits = scale_logits

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        if self.scale_logits:  # the logits are no longer the output of a layer: no head to refit
            logits = 2 * logits
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def noisy_fashion_mnist(num_train: int = 2000, num_verified: int = 400) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A training set with 40% symmetric label noise and a disjoint verified (clean) split."""
    full = load_fashion_mnist("train")
    train = corrupt_dataset(full.select(range(num_train)), rate=0.4, seed=0)
    return (train.remove_columns(["clean_labels", "is_corrupted"]),
            full.select(range(num_train, num_train + num_verified)))


def distributed_auto() -> tuple[nn.Module, datasets.Dataset, datasets.Dataset, RepairConfig, dict[str, Any]]:
    """An odd-sized verified split (uneven shards), every candidate, two runs per fold (own seeds) of each fine-tune,
    and training arguments that memorise."""
    train, verified = noisy_fashion_mnist(640, 301)
    torch.manual_seed(0)
    config = RepairConfig(method="auto", seed=0, alphas=[10.0, 1e3], batch_size=32, repair_disable_tqdm=True,
                          runs_per_fold=2)
    training = dict(num_train_epochs=10, per_device_train_batch_size=32, learning_rate=3e-3,
                    lr_scheduler_type="constant", save_strategy="epoch")
    return MLP(), train, verified, config, training


def rigged_heldout_predictions(winner: str, fresh_leads: bool = False
                               ) -> Callable[[CandidateBuilder, str, int], torch.Tensor]:
    """A `CandidateBuilder.heldout_predictions` under which `winner`, a refinement of fresh, predicts every held-out
    label and fresh all but one of each fold's (or, with `fresh_leads`, the other way round): fresh beats the
    trajectory, its refinements are judged, and `winner` is chosen. Every procedure still runs on every fold (its
    cost and collectives); the others predict as they would."""
    heldout_predictions = CandidateBuilder.heldout_predictions
    one_wrong = winner if fresh_leads else "fresh"  # the procedure that misses one held-out label a fold

    def rigged(builder: CandidateBuilder, procedure: str, fold: int) -> torch.Tensor:
        predicted = heldout_predictions(builder, procedure, fold)
        if procedure not in ("fresh", winner):
            return predicted
        labels = builder.trajectory.labels[builder.trajectory.folds == fold].clone()
        if procedure == one_wrong:
            labels[0] = (labels[0] + 1) % 10
        return labels

    return rigged
