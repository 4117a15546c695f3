"""Shared tools of the benchmark scripts: wall time, peak memory, markdown tables, `--set` for RepairConfig fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

from hf_repair import RepairConfig


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_mib: float = 0.0  # peak resident memory above the level at the start
    peak_gpu_mib: float = math.nan  # peak CUDA memory allocated above the level at the start; nan without CUDA


@contextmanager
def measure(interval_s: float = 0.002) -> Iterator[Measurement]:
    """Time a block and sample this process's RSS in a thread to find its peak increase.

    Where CUDA is available the block's GPU work is waited for before the clock stops, and its peak
    allocated GPU memory is recorded too (the peak counter is reset at the start, so blocks are not nested).
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_gpu = torch.cuda.memory_allocated()
    process = psutil.Process(os.getpid())
    start_rss = process.memory_info().rss
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    result = Measurement()
    sampler.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
            result.peak_gpu_mib = (torch.cuda.max_memory_allocated() - start_gpu) / 2**20
        result.seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result.peak_mib = (peak[0] - start_rss) / 2**20


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def gap_closed(repaired: float, noisy: float, clean: float) -> float | None:
    """Share of the gap to the clean-trained model that a repair closes."""
    gap = clean - noisy
    return (repaired - noisy) / gap if gap > 0 else None


def add_config_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set FIELD=VALUE ...`: RepairConfig fields to change from the script's own settings (`args.set`)."""
    parser.add_argument("--set", type=config_override, nargs="+", default=[], metavar="FIELD=VALUE",
                        help=f"Other RepairConfig fields, e.g. --set {example}.")


def config_override(text: str) -> tuple[str, object]:
    """argparse type for `--set FIELD=VALUE`: a RepairConfig field and its value, read as JSON where it parses."""
    name, sep, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(RepairConfig)}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD a RepairConfig field, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value
