"""Repairs one model in several distributed setups; run by tests/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_repair.py OUT_DIR

Every process repairs the same seeded model with the same verified split on CPU (gloo) and
writes its final full weights and metrics to OUT_DIR/{setup}_rank{r}.*, for the test to compare
across ranks and with a single-process repair:

- replicated: plain parameters (what DDP training leaves), the split given as a Dataset;
- loader: the split given as an Accelerate-prepared DataLoader whose last batch is padded;
- fsdp, fsdp_orig_params: FSDP (1), one unit per ViT layer, parameters sharded when the repair
  starts (flat parameters, and `use_orig_params=True` as Accelerate sets it);
- fsdp2: `fully_shard` on every ViT layer and the root;
- trainer: DDP training through `Trainer` with `RepairCallback`.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, default_data_collator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_repair import RepairCallback, Repairer  # noqa: E402

from distributed_setup import CONFIG, make_model, verified_split  # noqa: E402


def save(out_dir: str, setup: str, weights: dict[str, torch.Tensor], metrics: dict) -> None:
    rank = PartialState().process_index
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, f"{out_dir}/{setup}_rank{rank}.safetensors")
    with open(f"{out_dir}/{setup}_rank{rank}.json", "w") as f:
        json.dump(metrics, f)


def replicated(out_dir: str) -> None:
    model = make_model()
    result = Repairer(model, CONFIG).repair(verified_split())
    save(out_dir, "replicated", model.state_dict(), result.metrics)


def loader(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(DataLoader(verified_split(), batch_size=8, collate_fn=default_data_collator))
    model = make_model()
    result = Repairer(model, CONFIG).repair(prepared)
    save(out_dir, "loader", model.state_dict(), result.metrics)


def fsdp(out_dir: str, use_orig_params: bool = False) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.vit.modeling_vit import ViTLayer

    model = FSDP(make_model(), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({ViTLayer}),
                 use_orig_params=use_orig_params)
    result = Repairer(model, CONFIG).repair(verified_split())
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        weights = model.state_dict()
    save(out_dir, "fsdp_orig_params" if use_orig_params else "fsdp", weights, result.metrics)


def fsdp_orig_params(out_dir: str) -> None:
    fsdp(out_dir, use_orig_params=True)


def fsdp2(out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (PartialState().num_processes,))
    model = make_model()
    for layer in model.vit.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    result = Repairer(model, CONFIG).repair(verified_split())
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    save(out_dir, "fsdp2", weights, result.metrics)


def trainer(out_dir: str) -> None:
    model = make_model()
    args = TrainingArguments(output_dir=f"{out_dir}/trainer", use_cpu=True, max_steps=2, per_device_train_batch_size=8,
                             report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=verified_split())
    callback = RepairCallback(CONFIG, verified_split()).attach(trainer)
    trainer.train()
    save(out_dir, "trainer", model.state_dict(), callback.result.metrics)


if __name__ == "__main__":
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    out = sys.argv[1]
    for setup in sys.argv[2:]:
        globals()[setup](out)
        state.wait_for_everyone()
    state.wait_for_everyone()  # leave the gloo group together, after DDP let go of it: otherwise a rank can abort at exit
    gc.collect()
    state.destroy_process_group()
