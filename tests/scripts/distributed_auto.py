"""Trains under DDP with RepairCallback(method="auto"); run by tests/test_trajectory_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_auto.py OUT_DIR [fresh+REFINEMENT [leads]]

Every process writes the weights it ends with and the repair's metrics to OUT_DIR/auto_rank{r}.*; the
Trainer's checkpoints go to OUT_DIR/trainer for the single-process offline repair to choose from.
With a refinement of fresh named, only fresh and that refinement are judged, and the judge is rigged so that
the refinement wins (or, with `leads`, fresh leads it by one sample a fold and the refinement is taken over it):
the run ends with its refit on every verified sample, which the folds never reach.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from trajectory_setup import distributed_auto, rigged_heldout_predictions
from transformers import Trainer, TrainingArguments

from hf_repair import RepairCallback
from hf_repair.trajectory import CandidateBuilder

if __name__ == "__main__":
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    out = sys.argv[1]
    model, train, verified, config, training = distributed_auto()
    if len(sys.argv) > 2:
        CandidateBuilder.heldout_predictions = rigged_heldout_predictions(sys.argv[2], fresh_leads=sys.argv[3:] == ["leads"])
        config = dataclasses.replace(config, auto_candidates=["fresh", sys.argv[2].partition("+")[2]])
    args = TrainingArguments(output_dir=f"{out}/trainer", use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                             logging_strategy="no", **training)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    callback = RepairCallback(config, verified, write_report=False).attach(trainer)
    trainer.train()
    if callback.error is not None:
        raise callback.error
    rank = state.process_index
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{out}/auto_rank{rank}.safetensors")
    with open(f"{out}/auto_rank{rank}.json", "w") as f:
        json.dump(callback.result.metrics, f)
    state.wait_for_everyone()
    del trainer
    gc.collect()
    state.destroy_process_group()
