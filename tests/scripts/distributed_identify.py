"""Scores the training set in 2 processes; run by tests/test_identification.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_identify.py OUT_DIR

Every process shards the training set (indices[rank::world]) and the verified split, and writes
the gathered table it ends with, and the reference's log-probabilities of every class, to OUT_DIR/rank{r}.npz for
the test to compare with one process.
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_repair import identify_harmful  # noqa: E402

from identification_setup import distributed_case  # noqa: E402


def main(out_dir: str) -> None:
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state
    model, train, verified, config = distributed_case()
    identification = identify_harmful(model, train, verified, config, keep_reference_log_probs=True)
    table = identification.table.with_format("numpy")
    np.savez(os.path.join(out_dir, f"rank{state.process_index}.npz"), **{c: np.asarray(table[c]) for c in table.column_names},
             reference_log_probs=identification.reference_log_probs)
    state.wait_for_everyone()  # leave the gloo group together, after DDP let go of it: otherwise a rank can abort at exit
    gc.collect()
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
