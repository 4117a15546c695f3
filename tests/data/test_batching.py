"""Cutting variable-length samples into batches that pad least (`fewest_padded_tokens`)."""

import itertools

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_repair.data import VerifiedSplit
from hf_repair.data.batching import fewest_padded_tokens

from helpers import PadCollator


def padded_tokens(lengths, sizes):
    starts = np.cumsum([0, *sizes[:-1]])
    return sum(size * lengths[start] for size, start in zip(sizes, starts, strict=True))


def brute_force(lengths, num_batches, batch_size):
    """The fewest padded tokens over every way to cut `lengths` into at most `num_batches` batches."""
    n, best = len(lengths), float("inf")
    for count in range(1, num_batches + 1):
        for cuts in itertools.combinations(range(1, n), count - 1):
            sizes = np.diff([0, *cuts, n]).tolist()
            if max(sizes) <= batch_size:
                best = min(best, padded_tokens(lengths, sizes))
    return best


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=9), num_batches=st.integers(1, 5),
       batch_size=st.integers(1, 6))
def test_the_cut_is_valid_and_pads_least(lengths, num_batches, batch_size):
    lengths = np.array(sorted(lengths, reverse=True))
    if num_batches * batch_size < len(lengths):
        with pytest.raises(ValueError, match="do not fit"):
            fewest_padded_tokens(lengths, num_batches, batch_size)
        return
    sizes = fewest_padded_tokens(lengths, num_batches, batch_size)
    assert sum(sizes) == len(lengths) and len(sizes) <= num_batches
    assert all(1 <= size <= batch_size for size in sizes)
    assert padded_tokens(lengths, sizes) == brute_force(lengths, num_batches, batch_size)


def test_unsorted_lengths_are_refused():
    with pytest.raises(ValueError, match="longest first"):
        fewest_padded_tokens(np.array([3, 5, 2]), 2, 4)


def test_no_more_batches_than_padding_needs():
    assert fewest_padded_tokens(np.array([7] * 10), 4, 8) == [8, 2]  # one length: nothing to gain from a third


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_process_gets_as_many_nonempty_batches_that_pad_less_than_equal_ones(monkeypatch, world):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 61, size=301)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [[5] * k for k in lengths], "labels": (np.arange(301) % 2).tolist()})
    splits = []
    for rank in range(world):
        monkeypatch.setattr("hf_repair.data.verified.process_info", lambda rank=rank: (rank, world))
        splits.append(VerifiedSplit(dataset, num_folds=3, batch_size=16, seed=0, collate_fn=PadCollator(),
                                    input_names={"input_ids"}))
    for fold in range(3):
        batches = [list(split.batches(fold)) for split in splits]
        assert len({len(b) for b in batches}) == 1  # under FSDP/ZeRO-3 each forward is a collective
        assert all(1 <= len(batch.labels) <= 16 for b in batches for batch in b)
        padded = sum(batch.inputs["input_ids"].numel() for b in batches for batch in b)
        shards = [lengths[split.fold_indices[fold]] for split in splits]
        equal = sum(len(chunk) * chunk.max() for shard in shards for chunk in np.array_split(shard, -(-len(shard) // 16)))
        assert padded < 0.95 * equal
