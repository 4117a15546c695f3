"""Uniform weight averages: a running sum of fold runs equals the average of the runs it was given."""

import torch

from hf_repair.trajectory.averaging import FoldRunSum, average_weights


def test_average_weights_keeps_shared_tensors_and_takes_counters_from_the_latest_state():
    frozen = torch.tensor([7.0])
    states = [{"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "frozen": frozen, "step": torch.tensor(3)},
              {"w": torch.tensor([2.0, 4.0], dtype=torch.bfloat16), "frozen": frozen, "step": torch.tensor(5)}]
    average = average_weights(states, latest=0)
    assert torch.equal(average["w"], torch.tensor([1.5, 3.0], dtype=torch.bfloat16))
    assert average["frozen"] is frozen and int(average["step"]) == 3


def test_a_fold_run_sum_averages_as_average_weights_with_the_shared_keys_a_run_omits():
    shared = {"base": torch.tensor([1.0, 2.0])}
    runs = [{"a": torch.tensor([1.0, 3.0]), "step": torch.tensor(1)},
            {"a": torch.tensor([2.0, 5.0]), "base": torch.tensor([4.0, 2.0]), "step": torch.tensor(2)}]
    total = FoldRunSum()
    for state in runs:
        total.add(state)
    average = total.average(shared)
    expected = average_weights([{**shared, **state} for state in runs], latest=1)
    assert average.keys() == expected.keys() and all(torch.equal(average[k], expected[k]) for k in expected)
    assert torch.equal(average["base"], torch.tensor([2.5, 2.0])) and int(average["step"]) == 2
