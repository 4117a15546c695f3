"""Retention repair in 2 processes; run by tests/test_retention.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_retention.py OUT_DIR [SEPARATION [TRIM]]

The fine-tune runs under DDP (gloo, CPU): every process trains on its shard of each batch, all
score the same gathered held-out verified samples, so all take the same decisions and end with the
same weights; with TRIM (`small_loss_trim`) each process trims its own shard of a batch alike. SEPARATION
"forward" erases instead and learns the unflagged samples through a symmetric noise transition (auto's "forward");
"mixup" erases on batches mixed with themselves (`mixup_alpha`), each process its own shard alike; "mixup_text"
does so for a LoRA adapter on a tiny BERT, whose token ids are mixed as input embeddings.
Each writes them, and the repair's metrics, to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft import get_peft_model  # noqa: E402

from hf_repair import RepairConfig, Repairer  # noqa: E402
from hf_repair.identification.noise_rate import symmetric_transition  # noqa: E402
from hf_repair.retention import repair_with_finetuning  # noqa: E402
from testbed.experiments import SmallCNN  # noqa: E402
from testbed.noise import corrupt_dataset  # noqa: E402

from identification_setup import fashion_subsets  # noqa: E402
from lora_setup import base_model, data, lora_config  # noqa: E402


def case(separation: str = "belief", trim: float = 0.0):
    """Odd sizes, so shards, folds and the last batch are uneven."""
    if separation == "mixup_text":
        train, verified = data("bert", 301, seed=1), data("bert", 151, seed=2, noise=0.0)
        model = get_peft_model(base_model("bert"), lora_config("bert")).eval()
    else:
        train, verified = fashion_subsets(301, 151)
        train = corrupt_dataset(train, "symmetric", 0.4, seed=0)
        torch.manual_seed(0)
        model = SmallCNN(width=4).eval()
    erasing = separation in ("forward", "mixup", "mixup_text")
    config = RepairConfig(method="erase" if erasing else "retention", separation="belief" if erasing else separation,
                          score="loss", flag_rule="budget", flag_fraction=0.5, batch_size=16, retention_epochs=1.0,
                          retention_learning_rate=1e-2, target_modules="all", small_loss_trim=trim,
                          mixup_alpha=1.0 if separation.startswith("mixup") else 0.0, repair_disable_tqdm=True)
    return model, train, verified, config


def main(out_dir: str, separation: str, trim: float) -> None:
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state
    model, train, verified, config = case(separation, trim)
    if separation == "forward":
        transition = torch.tensor(symmetric_transition(0.4, 10))
        result = repair_with_finetuning(model, config, verified, train, noise_transition=transition)
    else:
        result = Repairer(model, config).repair(verified, train_dataset=train)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}
    metrics["least_trusted"] = min(record["trusted_fraction"] for stage in result.metrics["stages"].values()
                                   for record in stage["history"][1:])
    torch.save({"state": model.state_dict(), "metrics": metrics, "prepared": "_is_accelerate_prepared" in model.__dict__,
                "mixed_precision": str(AcceleratorState().mixed_precision)},
               os.path.join(out_dir, f"rank{state.process_index}.pt"))
    state.wait_for_everyone()  # leave the gloo group together, after DDP let go of it: otherwise a rank can abort at exit
    gc.collect()
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "belief", float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
