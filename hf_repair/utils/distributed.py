"""Free functions that behave the same in one process and under `accelerate launch`.

They read the process group from Accelerate's `PartialState` (a shared, lazily created
singleton), so hf_repair keeps no distributed state of its own.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes, reduce


def process_info() -> tuple[int, int]:
    """(process_index, num_processes) of the current run."""
    state = PartialState()
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    return PartialState().is_main_process


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce sum (one collective); the tensor itself in a single process."""
    if PartialState().num_processes == 1:
        return tensor
    return reduce(tensor, reduction="sum")


def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each process's tensor along dim 0, rank by rank, when lengths differ.

    Unlike `Accelerator.gather_for_metrics`, nothing is padded or duplicated: each process
    tells its length, Accelerate pads to the longest, and the padding is cut away after the gather.
    """
    if PartialState().num_processes == 1:
        return tensor
    lengths = gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    padded = pad_across_processes(tensor, dim=0)
    longest = padded.shape[0]
    gathered = gather(padded.contiguous())
    return torch.cat([gathered[rank * longest : rank * longest + n] for rank, n in enumerate(lengths)], dim=0)
