"""What a selection procedure run without one verified fold works with: the verified samples outside it, the config of
the fine-tunes inside it, and what kind of inputs its batches carry."""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np

from ..config import RepairConfig
from ..data import VerifiedSplit, stratified_folds
from ..retention import mixable


def verified_outside(verified: datasets.Dataset, split: VerifiedSplit, fold: int | None, seed: int) -> datasets.Dataset:
    """The verified samples outside fold `fold` (all of them for None), as a dataset: the split's folds, drawn by
    `seed` as the split drew them."""
    if fold is None:
        return verified
    folds = stratified_folds(np.asarray(split.labels_all), split.num_folds, seed)
    return verified.select(np.sort(np.concatenate([rows for f, rows in enumerate(folds) if f != fold])))


def inner_finetune_config(config: RepairConfig, run: int = 0) -> RepairConfig:
    """The config of the fine-tunes inside a procedure: no gate of their own, the outer folds judge them; each keeps
    its lowest-loss checkpoint on an inner fold. Run `run` of a fold gets its own repair seed (its own batch order and
    inner fold), 1000 apart so that no run repeats another's stage seeds."""
    return dataclasses.replace(config, method="erase", significance_test="none", min_improvement=-1.0,
                               repair_seed=config.repair_seed + 1000 * run)


def has_floating_inputs(split: VerifiedSplit) -> bool:
    """Whether the model takes a floating-point input (pixel values, features), not token ids alone."""
    return mixable(next(iter(split.batches(0))).inputs)
