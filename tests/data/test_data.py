"""Reading datasets fast and injecting known label noise: the ground truth every benchmark scores against."""

import datasets
import numpy as np
import pytest

from hf_repair.data import column_array, numpy_batches
from testbed.noise import FASHION_MNIST_CONFUSABLE_PAIRS, corrupt_dataset

IMAGE = datasets.Array3D(shape=(1, 4, 4), dtype="float32")
NESTED = datasets.List(datasets.List(datasets.List(datasets.Value("float32"))))
LABELS = datasets.ClassLabel(num_classes=10)


def _images(n=300, feature=IMAGE, seed=0):
    rng = np.random.default_rng(seed)
    features = datasets.Features({"pixel_values": feature, "labels": LABELS})
    return datasets.Dataset.from_dict(
        {"pixel_values": rng.normal(size=(n, 1, 4, 4)).astype(np.float32), "labels": np.arange(n) % 10},
        features=features,
    )


@pytest.mark.parametrize("feature", [IMAGE, NESTED], ids=["Array3D", "nested lists"])
def test_numpy_batches_match_the_formatter_on_selections(feature):
    dataset = _images(feature=feature).shuffle(seed=1).select(range(7, 250))  # an indices mapping, like select()
    formatted = dataset.with_format("numpy")
    batches = list(numpy_batches(dataset, 64))
    assert [len(b["labels"]) for b in batches] == [64, 64, 64, 51]
    for i, batch in enumerate(batches):
        expected = formatted[64 * i : 64 * (i + 1)]
        assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].flags.writeable
        np.testing.assert_array_equal(batch["pixel_values"], expected["pixel_values"])
        np.testing.assert_array_equal(batch["labels"], expected["labels"])


def test_numpy_batches_leave_ragged_and_text_columns_to_the_formatter():
    dataset = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6], [7, 8]], "text": list("abcd"),
                                          "labels": [0, 1, 0, 1]})
    first, second = numpy_batches(dataset, 2)
    assert first["input_ids"].dtype == object and list(first["input_ids"][1]) == [3]
    assert list(first["text"]) == ["a", "b"] and list(second["labels"]) == [0, 1]
    assert [list(row) for row in second["input_ids"]] == [[4, 5, 6], [7, 8]]


def test_column_array_ignores_transforms_and_reads_selections():
    dataset = _images().select([5, 3, 11])
    dataset.set_transform(lambda batch: {"labels": [0 for _ in batch["labels"]]})
    np.testing.assert_array_equal(column_array(dataset, "labels"), [5, 3, 1])


@pytest.mark.parametrize("feature", [IMAGE, NESTED], ids=["Array3D", "nested lists"])
def test_symmetric_noise_corrupts_exactly_the_rate_and_keeps_the_features(feature):
    clean = _images(n=1000, feature=feature).select(range(100, 1000))
    noisy = corrupt_dataset(clean, "symmetric", 0.4, seed=3)
    assert noisy.features["pixel_values"] == feature  # the image feature survives add_column on a selection
    assert noisy.features["labels"] == noisy.features["clean_labels"] == LABELS
    labels, truth = column_array(noisy, "labels"), column_array(noisy, "clean_labels")
    corrupted = column_array(noisy, "is_corrupted")
    np.testing.assert_array_equal(truth, column_array(clean, "labels"))
    np.testing.assert_array_equal(corrupted, labels != truth)
    assert corrupted.mean() == pytest.approx(0.4)
    # every wrong class is used: symmetric noise spreads over the other nine
    assert len(np.unique(labels[corrupted & (truth == 0)])) == 9
    np.testing.assert_array_equal(column_array(corrupt_dataset(clean, "symmetric", 0.4, seed=3), "labels"), labels)


def test_asymmetric_noise_flips_only_to_the_paired_class():
    clean = _images(n=1000)
    noisy = corrupt_dataset(clean, "asymmetric", 0.2, seed=0, pairs=FASHION_MNIST_CONFUSABLE_PAIRS)
    labels, truth = column_array(noisy, "labels"), column_array(noisy, "clean_labels")
    flipped = labels != truth
    assert flipped.mean() == pytest.approx(0.2, abs=0.02)
    assert all(FASHION_MNIST_CONFUSABLE_PAIRS[t] == y for t, y in zip(truth[flipped], labels[flipped], strict=True))


def test_corrupting_twice_is_refused():
    noisy = corrupt_dataset(_images(n=50), "symmetric", 0.2, seed=0)
    with pytest.raises(ValueError, match="already has a 'clean_labels' column"):
        corrupt_dataset(noisy, "symmetric", 0.2, seed=0)
