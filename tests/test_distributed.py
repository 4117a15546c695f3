"""Multi-process repairs: sharding of the verified split, and 2 real processes on CPU (gloo).

The launch runs tests/scripts/distributed_repair.py once under `accelerate launch --multi_gpu
--num_processes 2` (with `PartialState(cpu=True)` in the script, so gloo on CPU) for every setup,
and the tests compare what each process ended with.
"""

import json
import os
import sys
import types

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from hf_repair import Repairer
from hf_repair.data import VerifiedSplit
from hf_repair.modeling.sharding import WeightAccess, ZeRO3WeightAccess, weight_access_for
from hf_repair.modeling.weights import WeightSnapshot

from distributed_setup import CONFIG, NUM_VERIFIED, make_model, verified_split  # noqa: E402
from helpers import launch_two_processes

SETUPS = ["replicated", "loader", "fsdp", "fsdp_orig_params", "fsdp2", "trainer"]




@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    launch_two_processes("distributed_repair.py", out, *SETUPS)
    return out


@pytest.fixture(scope="module")
def single_process():
    model = make_model()
    result = Repairer(model, CONFIG).repair(verified_split())
    return model.state_dict(), result.metrics


def ranks(out, setup):
    weights = [load_file(str(out / f"{setup}_rank{r}.safetensors")) for r in range(2)]
    metrics = [json.loads((out / f"{setup}_rank{r}.json").read_text()) for r in range(2)]
    return weights, metrics


@pytest.mark.parametrize("setup", SETUPS)
def test_processes_end_bit_identical_with_every_sample_counted_once(launched, setup):
    (w0, w1), (m0, m1) = ranks(launched, setup)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    m0, m1 = ({k: v for k, v in m.items() if not k.endswith("_time_s")} for m in (m0, m1))  # timings are per process
    assert m0 == m1
    assert m0["num_verified"] == NUM_VERIFIED  # a padded loader would give 64
    assert m0["adopted"]


@pytest.mark.parametrize("setup", ["replicated", "fsdp", "fsdp_orig_params", "fsdp2"])
def test_two_processes_match_the_single_process_repair(launched, single_process, setup):
    reference, reference_metrics = single_process
    (weights, _), (metrics, _) = ranks(launched, setup)
    assert metrics["alpha"] == reference_metrics["alpha"]
    assert metrics["accuracy_before"] == pytest.approx(reference_metrics["accuracy_before"])
    assert metrics["accuracy_after"] == pytest.approx(reference_metrics["accuracy_after"])
    assert weights.keys() == reference.keys()
    changed = 0
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, make_model().state_dict()[name])
    assert changed >= 10  # the repair did change the targets (Linear weights of 2 layers and the head)


def test_only_the_main_process_writes_the_report(launched):
    files = os.listdir(launched / "trainer")
    # atomic writes stage in `.NAME.tmp-<id>` siblings; none may be left behind by either process
    assert "repair_results.json" in files and not [f for f in files if ".tmp-" in f]


def test_shards_cover_each_fold_once_with_equal_batch_counts(monkeypatch):
    dataset = verified_split()
    splits = []
    for rank in range(3):
        monkeypatch.setattr("hf_repair.data.verified.process_info", lambda rank=rank: (rank, 3))
        splits.append(VerifiedSplit(dataset, num_folds=3, batch_size=6, seed=0))
    for fold in range(3):
        shards = [s.fold_indices[fold] for s in splits]
        merged = sorted(int(i) for shard in shards for i in shard)
        assert len(merged) == len(set(merged))  # nobody counts a sample twice
        counts = {len(list(s.batches(fold))) for s in splits}
        assert len(counts) == 1  # under FSDP/ZeRO-3 each forward is a collective
        assert all(len(b.labels) <= 6 for s in splits for b in s.batches(fold))
    assert sorted(i for s in splits for f in s.fold_indices for i in f.tolist()) == list(range(NUM_VERIFIED))


@pytest.mark.parametrize("split_batches", [False, True])
def test_prepared_loader_padding_is_not_counted(monkeypatch, split_batches):
    loader = DataLoader(verified_split(), batch_size=8, collate_fn=default_data_collator)
    total = 0
    for rank in range(2):
        monkeypatch.setattr("hf_repair.data.verified.process_info", lambda rank=rank: (rank, 2))
        prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                       split_batches=split_batches)
        assert sum(len(b["labels"]) for b in prepared) > NUM_VERIFIED / 2  # padded: 32 each
        total += VerifiedSplit(prepared, num_folds=3, batch_size=8, seed=0).total_samples
    assert total == NUM_VERIFIED


def test_plain_models_use_plain_weight_access():
    assert type(weight_access_for(make_model())) is WeightAccess


def test_zero3_weights_are_gathered_and_written_back_from_rank_0(monkeypatch):
    """Contract with DeepSpeed's documented API, with a stand-in that partitions like ZeRO-3.

    Outside `GatheredParameters` a parameter holds an empty tensor; inside it holds the full
    weight; on exit with `modifier_rank` set the (rank 0) values are partitioned again, else dropped.
    """
    calls = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params, self.modifier_rank = params, modifier_rank
            calls.append(modifier_rank)

        def __enter__(self):
            for p in self.params:
                p.data = p.ds_full.clone()

        def __exit__(self, *exc):
            for p in self.params:
                if self.modifier_rank is not None:
                    p.ds_full = p.data.clone()
                p.data = torch.empty(0)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)

    layer = nn.Linear(3, 2)
    full = layer.weight.detach().clone()
    layer.weight.ds_id, layer.weight.ds_full = 0, full.clone()
    layer.weight.data = torch.empty(0)
    access = weight_access_for(layer)
    assert isinstance(access, ZeRO3WeightAccess)

    snapshot = WeightSnapshot({"layer": layer}, access)
    assert torch.equal(snapshot.original("layer"), full) and calls == [None]
    snapshot.write("layer", 2 * full)
    assert calls[-1] == 0 and torch.equal(layer.weight.ds_full, 2 * full)
    assert layer.weight.numel() == 0  # partitioned again
    snapshot.restore()
    assert torch.equal(layer.weight.ds_full, full) and snapshot.is_unchanged()
