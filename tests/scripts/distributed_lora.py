"""Repairs a LoRA fine-tune (peft) in 2 processes; run by tests/peft/test_lora_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_lora.py OUT_DIR

Every process builds the same LoRA-fine-tuned tiny ViT, then repairs it with the projection (the
verified split sharded across processes) and, on a fresh copy, with erase (a DDP fine-tune of the
adapter). Each writes the adapter's saved weights (`get_peft_model_state_dict`, what `save_pretrained`
writes), the frozen base's and the metrics to OUT_DIR/{method}_rank{r}.pt.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys

import torch
from accelerate import PartialState
from peft import get_peft_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_repair import Repairer  # noqa: E402

from lora_setup import FORCED, base_state, data, lora_finetuned  # noqa: E402

CONFIGS = {
    "projection": dataclasses.replace(FORCED, target_modules="all"),
    "erase": dataclasses.replace(FORCED, method="erase", flag_rule="budget", flag_fraction=0.3, retention_epochs=2.0,
                                 retention_learning_rate=3e-3),
}


def main(out_dir: str) -> None:
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state
    for method, config in CONFIGS.items():
        model = lora_finetuned("vit")
        train = data("vit", 96, seed=1) if method == "erase" else None
        result = Repairer(model, config).repair(data("vit", 61, seed=2, noise=0.0), train_dataset=train)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}
        adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        torch.save({"adapter": adapter, "base": base_state(model), "metrics": metrics},
                   os.path.join(out_dir, f"{method}_rank{state.process_index}.pt"))
        state.wait_for_everyone()
    gc.collect()
    state.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
