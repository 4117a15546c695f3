"""Test helpers shared by several test modules: tiny models, collators, paths."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

SCRIPTS = Path(__file__).resolve().parent / "scripts"  # scripts the tests launch (accelerate launch, the CLI)


def launch_two_processes(script: str, *args: str, mixed_precision: str = "no", timeout: int = 300) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` of a tests/scripts script on CPU (gloo), on a free port.

    Skips the calling test where torch has no gloo backend.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", str(port), str(SCRIPTS / script), *map(str, args)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


class TinyCNN(nn.Module):
    """One convolution and one linear layer over (batch, 1, size, size) images: every adapter in two layers."""

    def __init__(self, num_classes: int = 3, size: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, num_classes)

    def forward(self, pixel_values, labels=None):
        return ImageClassifierOutput(logits=self.fc(torch.relu(self.conv(pixel_values)).flatten(1)))


class PadCollator:
    """DataCollatorWithPadding without a tokenizer file: pads input_ids with 0 and builds the mask."""

    def __call__(self, rows):
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([int(r["labels"]) for r in rows])}


def with_image_transform(dataset):
    """The `run_image_classification.py` layout: raw `image`/`label` columns, `set_transform` builds `pixel_values`."""
    raw = dataset.with_format(None).rename_columns({"pixel_values": "image", "labels": "label"})

    def transform(batch):
        return {"pixel_values": [torch.tensor(np.asarray(im, dtype=np.float32)) for im in batch["image"]],
                "label": batch["label"]}

    raw.set_transform(transform)
    return raw


def image_collate(rows):
    """A hand-written image collator that needs the `label` key, as such collators do."""
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([int(r["label"]) for r in rows])}
