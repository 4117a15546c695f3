"""Method "auto" under DDP: 2 real processes on CPU (gloo) train with RepairCallback and end bit-identical."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from trajectory_setup import MLP, distributed_auto  # noqa: E402

from hf_repair import Repairer
from hf_repair.trajectory import list_checkpoints, read_checkpoint
from testbed.offline_data import DEFAULT_FASHION_MNIST_ROOT

from helpers import launch_two_processes

pytestmark = [
    pytest.mark.slow,  # two processes launched, trained and repaired, four times: about 130 s
    pytest.mark.skipif(
        not os.path.exists(os.path.join(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")),
        reason="needs Fashion-MNIST: apt-get update && apt-get install -y dataset-fashion-mnist",
    ),
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto_ddp")
    return out, *launch(out)


def launch(out, *args):
    launch_two_processes("distributed_auto.py", out, *args)
    weights = [load_file(str(out / f"auto_rank{r}.safetensors")) for r in range(2)]
    metrics = [json.loads((out / f"auto_rank{r}.json").read_text()) for r in range(2)]
    return weights, metrics


def assert_same_on_every_process(weights, metrics):
    w0, w1 = weights
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    m0, m1 = ({k: v for k, v in m.items() if k != "repair_time_s"} for m in metrics)
    assert m0 == m1


def test_every_process_ends_with_the_same_weights_and_choice(launched):
    _, weights, metrics = launched
    assert_same_on_every_process(weights, metrics)
    m0 = metrics[0]
    assert m0["num_verified"] == 301 and m0["adopted"] and len(m0["trajectory"]) == 10
    # every refinement ran on both processes, fresh and retrain from the initial weights the callback kept on each
    assert {name.split("+")[-1] for name in m0["heldout_accuracy"]} >= {"fresh", "head_refit", "projection", "erase",
                                                                         "retrain"}


def test_the_trajectory_scores_match_a_single_process_from_the_checkpoints(launched):
    """Every verified sample is scored once however it is sharded: the base procedures' held-out accuracies,
    which depend on no sample order, equal those of a single-process repair from the saved checkpoints."""
    out, _, (metrics, _) = launched
    _, _, verified, config, _ = distributed_auto()
    model = MLP()
    model.load_state_dict(read_checkpoint(list_checkpoints(out / "trainer")[-1]))
    offline = Repairer(model, config).repair(verified, checkpoints=out / "trainer").metrics
    assert [p["accuracy"] for p in offline["trajectory"]] == [p["accuracy"] for p in metrics["trajectory"]]
    for name in ("final", "best", "average", "soup"):
        assert offline["heldout_accuracy"][name] == metrics["heldout_accuracy"][name], name


@pytest.mark.parametrize("procedure, fresh_leads", [("fresh+retrain", False), ("fresh+forward", True),
                                                     ("fresh+reweight", False)])
def test_a_refinement_of_fresh_is_refitted_alike_on_every_process(tmp_path, procedure, fresh_leads):
    """A refinement of fresh, chosen (the script rigs the folds' verdict), ends with the refit the folds never reach:
    fresh and its identification on every verified sample, then num_folds fine-tunes averaged; the noise rate and
    transition calibrated by fresh's fold models over both processes' shards of the training set. The same on both
    processes, also where fresh leads the folds and its refinement is taken over it."""
    weights, metrics = launch(tmp_path, procedure, *(["leads"] if fresh_leads else []))
    assert_same_on_every_process(weights, metrics)
    m = metrics[0]
    assert m["chosen"] == procedure and m["adopted"] and m["chosen_points"] == []
    assert "fold_run_averages" not in m  # refitted, not the average of its fold runs
    assert ("fresh_over_candidate" in m) == fresh_leads
    assert 0 < m["fresh_noise_rate"]["rate"] < 1  # calibrated by fresh's fold models over both processes' shards
    estimated = m["fresh_identification"]  # fold models' scores of both shards: a cut missing one would skew it
    assert estimated["flag_precision_source"] == "fresh_fold_models" and 0.5 < estimated["estimated_flag_precision"]
    model, _, verified, _, _ = distributed_auto()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    final = read_checkpoint(list_checkpoints(tmp_path / "trainer")[-1])
    assert all(not torch.equal(weights[0][key], state[key]) for state in (initial, final) for key in initial)
    model.load_state_dict(weights[0])
    every = verified[:]
    with torch.no_grad():
        logits = model(every["pixel_values"]).logits
    accuracy = float((logits.argmax(-1) == every["labels"]).double().mean())
    assert accuracy > m["accuracy_before"] + 0.05  # it learnt verified samples the final weights got wrong
