"""Label-noise injection, for benchmarks and for users who want to measure a repair.

A repair can only be scored where the corruption is known. These functions corrupt clean
labels reproducibly and return which samples were changed, so flagging precision/recall
and the accuracy gap closed by a repair can be computed on real data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from hf_repair.data import column_array

logger = logging.getLogger(__name__)

# Fashion-MNIST classes that people and models confuse most, as a flip for each class:
# T-shirt/top <-> Shirt, Pullover <-> Coat, Sandal <-> Sneaker, Ankle boot -> Sneaker,
# Trouser -> Dress, Dress -> Coat, Bag -> T-shirt/top. Every class has a partner, so
# `rate` is both the overall and the per-class corruption rate.
FASHION_MNIST_CONFUSABLE_PAIRS: dict[int, int] = {0: 6, 1: 3, 2: 4, 3: 4, 4: 2, 5: 7, 6: 0, 7: 5, 8: 0, 9: 7}

NOISE_TYPES: tuple[str, ...] = ("symmetric", "asymmetric", "transition")


def _check_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Return labels as a 1-D int64 array after checking they are valid class ids."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {array.dtype}.")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{array.min()}, {array.max()}].")
    return array


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}.")


def symmetric_noise(
    labels: Sequence[int] | np.ndarray, rate: float, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the labels of exactly `round(rate * n)` random samples by a different class.

    The new label is drawn uniformly from the other `num_classes - 1` classes, so every
    corrupted sample really carries a wrong label. Returns `(noisy_labels, is_corrupted)`.
    """
    clean = _check_labels(labels, num_classes)
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    corrupted = rng.choice(len(clean), size=round(rate * len(clean)), replace=False)
    noisy = clean.copy()
    noisy[corrupted] = (clean[corrupted] + rng.integers(1, num_classes, size=len(corrupted))) % num_classes
    return noisy, noisy != clean


def asymmetric_noise(
    labels: Sequence[int] | np.ndarray,
    rate: float,
    num_classes: int,
    seed: int = 0,
    pairs: Mapping[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Flip labels to a fixed, confusable partner class (class-dependent noise).

    `pairs` maps a source class to the class its corrupted samples receive. By default each
    class c flips to (c + 1) % num_classes (the "pair-flip" noise of Co-teaching, Han et al.
    2018); pass `FASHION_MNIST_CONFUSABLE_PAIRS` for Fashion-MNIST's natural confusions.
    Exactly `round(rate * m)` samples are flipped, drawn uniformly from the `m` samples whose
    class has a partner; classes absent from `pairs` keep their labels. Returns
    `(noisy_labels, is_corrupted)`.
    """
    clean = _check_labels(labels, num_classes)
    _check_rate(rate)
    if pairs is None:
        pairs = {c: (c + 1) % num_classes for c in range(num_classes)}
    for source, target in pairs.items():
        if not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ValueError(f"pairs entry {source} -> {target} is outside [0, {num_classes}).")
        if source == target:
            raise ValueError(f"pairs maps class {source} to itself, which would not corrupt it.")
    partner = np.arange(num_classes)
    partner[list(pairs)] = list(pairs.values())
    eligible = np.flatnonzero(partner[clean] != clean)
    rng = np.random.default_rng(seed)
    corrupted = rng.choice(eligible, size=round(rate * len(eligible)), replace=False)
    noisy = clean.copy()
    noisy[corrupted] = partner[clean[corrupted]]
    return noisy, noisy != clean


def transition_noise(
    labels: Sequence[int] | np.ndarray, matrix: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw each noisy label from row `label` of a row-stochastic transition matrix.

    Use it with a measured matrix such as
    `testbed.offline_data.cifar10n_transition_matrix()` for realistic human noise. The
    number of corrupted samples is random here; `is_corrupted` marks those whose label
    changed. Returns `(noisy_labels, is_corrupted)`.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {matrix.shape}.")
    if (matrix < 0).any() or not np.allclose(matrix.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("matrix must be row-stochastic: non-negative rows that sum to 1.")
    clean = _check_labels(labels, matrix.shape[0])
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(matrix, axis=1)[clean]
    draws = rng.random(len(clean))[:, None]
    noisy = np.minimum((draws >= cumulative).sum(axis=1), matrix.shape[0] - 1)
    return noisy, noisy != clean


def corrupt_dataset(
    dataset: datasets.Dataset,
    noise: str = "symmetric",
    rate: float = 0.4,
    seed: int = 0,
    label_column: str = "labels",
    num_classes: int | None = None,
    pairs: Mapping[int, int] | None = None,
    matrix: np.ndarray | None = None,
) -> datasets.Dataset:
    """Return a copy of `dataset` whose `label_column` holds noisy labels.

    The original labels are kept in a `clean_labels` column and a boolean `is_corrupted`
    column marks the changed rows, so repairs can be scored against the truth. `noise` is
    "symmetric", "asymmetric" (uses `pairs`) or "transition" (uses `matrix`; `rate` is
    ignored). `num_classes` defaults to the size of the label column's `ClassLabel`.
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {list(NOISE_TYPES)}, got {noise!r}.")
    if label_column not in dataset.column_names:
        raise ValueError(f"Column {label_column!r} not found; the dataset has {dataset.column_names}.")
    for column in ("clean_labels", "is_corrupted"):
        if column in dataset.column_names:
            raise ValueError(f"The dataset already has a {column!r} column; corrupt the clean dataset instead.")
    label_feature = dataset.features[label_column]
    if num_classes is None:
        if isinstance(label_feature, datasets.ClassLabel):
            num_classes = label_feature.num_classes
        elif noise == "transition" and matrix is not None:
            num_classes = len(matrix)
        else:
            raise ValueError(f"Column {label_column!r} is not a ClassLabel; pass num_classes.")

    clean = column_array(dataset, label_column)
    if noise == "symmetric":
        noisy, is_corrupted = symmetric_noise(clean, rate, num_classes, seed)
    elif noise == "asymmetric":
        noisy, is_corrupted = asymmetric_noise(clean, rate, num_classes, seed, pairs=pairs)
    else:
        if matrix is None:
            raise ValueError('noise="transition" needs a transition `matrix`.')
        if len(matrix) != num_classes:
            raise ValueError(f"matrix has {len(matrix)} classes but the labels have {num_classes}.")
        noisy, is_corrupted = transition_noise(clean, matrix, seed)
    logger.info(
        "Corrupted %d of %d labels (%.1f%%) with %s noise.",
        is_corrupted.sum(),
        len(clean),
        100 * is_corrupted.mean(),
        noise,
    )

    corrupted = dataset.rename_column(label_column, "clean_labels")
    corrupted = corrupted.add_column(label_column, noisy, feature=label_feature)
    corrupted = corrupted.add_column("is_corrupted", is_corrupted, feature=datasets.Value("bool"))
    # add_column on a selection re-infers the other columns' features (Array3D images become nested
    # lists, many times slower to batch); keep the ones the caller had.
    features = corrupted.features.copy()
    features.update({name: feature for name, feature in dataset.features.items() if name != label_column})
    features["clean_labels"] = label_feature
    return corrupted if features == corrupted.features else corrupted.cast(features)
