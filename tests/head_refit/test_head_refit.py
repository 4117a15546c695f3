"""Head refit as a repair, on Fashion-MNIST with 40% symmetric label noise: judged out-of-fold, gated, undoable."""

import os

import pytest
import torch
from trajectory_setup import MLP, noisy_fashion_mnist  # noqa: E402

from hf_repair import RepairConfig, Repairer
from hf_repair.head_refit import out_of_fold_logits
from testbed.experiments import evaluate_accuracy, train_classifier
from testbed.offline_data import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")),
    reason="needs Fashion-MNIST: apt-get update && apt-get install -y dataset-fashion-mnist",
)
QUIET = dict(seed=0, repair_disable_tqdm=True)


@pytest.fixture(scope="module")
def data():
    return *noisy_fashion_mnist(), load_fashion_mnist("test").select(range(2000))


def trained(train, epochs, **kwargs):
    torch.manual_seed(0)
    model = MLP(**kwargs)
    return train_classifier(model, train, epochs=epochs, batch_size=64, lr=3e-3, progress=False)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model, expected):
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_head_refit_repairs_a_model_that_memorised_its_noisy_labels(data):
    train, verified, test = data
    model = trained(train, epochs=20)
    before, test_before = state(model), evaluate_accuracy(model, test)
    result = Repairer(model, RepairConfig(method="head_refit", **QUIET)).repair(verified)
    m = result.metrics
    assert result.adopted and m["significant"] and m["head"] == "head"
    assert m["p_value"] < 0.01 and m["gain_ci"][0] > 0
    assert m["accuracy_after"] == m["heldout_refit_accuracy"] > m["accuracy_before"] + 0.05
    assert evaluate_accuracy(model, test) > test_before + 0.05  # on data neither the refit nor its judge saw
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == ["head.bias", "head.weight"]
    result.undo()
    assert_state(model, before)


def test_a_refit_within_noise_leaves_the_model_bit_identical(data):
    train, verified, _ = data
    model = trained(train, epochs=5)  # stopped before memorising: the refit gains little
    before = state(model)
    result = Repairer(model, RepairConfig(method="head_refit", **QUIET)).repair(verified)
    assert not result.adopted and not result.metrics["significant"]
    assert result.metrics["accuracy_after"] == result.metrics["accuracy_before"]
    assert_state(model, before)


def test_projection_then_head_refit_undoes_both(data):
    train, verified, _ = data
    model = trained(train, epochs=20)
    before = state(model)
    config = RepairConfig(method="projection+head_refit", alphas=[1.0, 10.0, 100.0], significance_test="none",
                          min_improvement=-1.0, **QUIET)
    result = Repairer(model, config).repair(verified)
    m = result.metrics
    assert m["projection_adopted"] and m["projection"]["alpha"] == m["alpha"] is not None
    assert m["head_refit_adopted"] and result.adopted
    assert m["accuracy_before"] == m["projection"]["accuracy_before"]
    assert set(result.layers) >= {"head", "body.1", "body.3"}
    assert not torch.equal(model.body[1].weight, before["body.1.weight"])
    result.undo()
    assert_state(model, before)


def test_the_out_of_fold_refit_never_sees_the_fold_it_predicts():
    torch.manual_seed(0)
    features = torch.cat([torch.randn(90, 4, dtype=torch.float64), torch.ones(90, 1, dtype=torch.float64)], dim=1)
    labels = torch.arange(90) % 3
    folds = torch.arange(90) % 3
    anchor = torch.randn(3, 5, dtype=torch.float64)
    logits = out_of_fold_logits(features, labels, folds, anchor, seed=0)
    relabelled = labels.clone()
    relabelled[folds == 1] = (labels[folds == 1] + 1) % 3  # only fold 1's labels change
    changed = out_of_fold_logits(features, relabelled, folds, anchor, seed=0)
    assert torch.equal(logits[folds == 1], changed[folds == 1])
    assert not torch.equal(logits[folds == 0], changed[folds == 0])


def test_a_model_whose_logits_are_not_a_layer_output_has_no_head_to_refit(data):
    train, verified, _ = data
    model = trained(train, epochs=1, scale_logits=True)
    before = state(model)
    with pytest.raises(ValueError, match="no layer whose output is the logits"):
        Repairer(model, RepairConfig(method="head_refit", **QUIET)).repair(verified)
    assert_state(model, before)
