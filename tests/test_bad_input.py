"""Generated bad input: every repair entry point answers with a clear error of ours and leaves the model untouched."""

import traceback

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_repair import RepairConfig, Repairer

NUM_CLASSES = 3
FEATURES = 6


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, 8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, pixel_values, labels=None):
        return SequenceClassifierOutput(logits=self.head(torch.relu(self.hidden(pixel_values))))


def valid_columns(rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.normal(size=(rows, FEATURES)).astype(np.float32).tolist(),
            "labels": (np.arange(rows) % NUM_CLASSES).tolist()}


def _bad_cell(columns, rng):
    row, col = int(rng.integers(len(columns["labels"]))), int(rng.integers(FEATURES))
    columns["pixel_values"][row][col] = float(rng.choice([np.nan, np.inf, -np.inf]))
    return columns


def _label_out_of_range(columns, rng):
    columns["labels"][int(rng.integers(len(columns["labels"])))] = int(rng.choice([-1, NUM_CLASSES, 10**6]))
    return columns


def _float_labels(columns, rng):
    columns["labels"] = [x + 0.5 for x in columns["labels"]]
    return columns


def _string_labels(columns, rng):
    columns["labels"] = [f"class {x}" for x in columns["labels"]]
    return columns


def _missing_label_column(columns, rng):
    columns["label_" + str(int(rng.integers(100)))] = columns.pop("labels")
    return columns


def _unknown_input_column(columns, rng):
    columns[str(rng.choice(["image", "inputs", "x", "features"]))] = columns.pop("pixel_values")
    return columns


def _ragged_rows(columns, rng):
    row = int(rng.integers(len(columns["labels"])))
    columns["pixel_values"][row] = columns["pixel_values"][row][: int(rng.integers(1, FEATURES))]
    return columns


def _too_few_rows(columns, rng):
    keep = int(rng.integers(0, 6))  # 3 verified folds need at least 6 samples
    return {name: values[:keep] for name, values in columns.items()}


def _no_rows(columns, rng):
    return {name: [] for name in columns}


CORRUPTIONS = [_bad_cell, _label_out_of_range, _float_labels, _string_labels, _missing_label_column,
               _unknown_input_column, _ragged_rows, _too_few_rows, _no_rows]


def raised_by_hf_repair(error: BaseException) -> bool:
    """Whether the innermost frame that raised is hf_repair's own check (not torch, datasets or numpy)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/hf_repair/" in frames[-1].filename


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(corruption=st.sampled_from(CORRUPTIONS), rows=st.integers(12, 40), seed=st.integers(0, 2**16),
       method=st.sampled_from(["projection", "erase"]))
def test_bad_data_gets_our_error_and_the_model_stays_bit_identical(corruption, rows, seed, method):
    assume(not (method == "erase" and corruption is _too_few_rows))  # a training set may be small, not empty
    rng = np.random.default_rng(seed)
    bad = corruption(valid_columns(rows, seed), rng)
    try:
        dataset = datasets.Dataset.from_dict(bad)
    except Exception as err:  # pyarrow refuses mixed types before anything reaches hf_repair
        pytest.skip(f"datasets itself refuses this table ({type(err).__name__}); nothing reaches hf_repair")
    torch.manual_seed(0)
    model = TinyMLP()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    config = RepairConfig(method=method, target_modules="all-linear", disable_tqdm=True, retention_epochs=0.2)
    clean_train = datasets.Dataset.from_dict(valid_columns(30, seed + 1))
    with pytest.raises((ValueError, TypeError)) as caught:
        if method == "projection":
            Repairer(model, config).repair(dataset)
        else:  # the bad split as the training set: it is checked as carefully as the verified one
            Repairer(model, config).repair(clean_train, train_dataset=dataset)
    assert raised_by_hf_repair(caught.value), "".join(traceback.format_exception(caught.value))
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
