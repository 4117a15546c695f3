"""The contrastive fine-tune in 2 processes; run by tests/retention/test_contrastive.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_contrastive.py OUT_DIR

A tiny BERT whose token states are paired: every process draws the same pairs and trains on its shard of each
batch under DDP (gloo, CPU) with the head and the pooler (which the pair loss never reaches) frozen, so all end
with the same weights. Each writes them to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_repair import RepairConfig  # noqa: E402
from hf_repair.evaluation import default_forward  # noqa: E402
from hf_repair.retention.contrastive import contrastive_finetune  # noqa: E402

from lora_setup import base_model, data  # noqa: E402


def main(out_dir: str) -> None:
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state
    verified, model = data("bert", 151, seed=2, noise=0.0), base_model("bert").eval()  # odd: uneven last batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RepairConfig(fresh_contrastive_iterations=2, fresh_contrastive_learning_rate=1e-3, batch_size=8,
                          repair_disable_tqdm=True)
    result = contrastive_finetune(model, model.classifier, verified, config, default_forward)
    frozen = {k for k in before if k.startswith(("classifier.", "bert.pooler."))}  # no gradient reaches them
    torch.save({"state": model.state_dict(), "steps": result.steps,
                "changed": any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k not in frozen),
                "frozen_changed": any(not torch.equal(model.state_dict()[k], before[k]) for k in frozen)},
               os.path.join(out_dir, f"rank{state.process_index}.pt"))
    state.wait_for_everyone()  # leave the gloo group together, after DDP let go of it
    gc.collect()
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
