"""The contrastive fine-tune of `fresh_objective="contrastive"`: its pairs, what it learns, what it leaves alone.

Real Fashion-MNIST images and a small untrained CNN: a few hundred steps on pairs of 300 verified images
pull same-class features together on images it never saw.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from hf_repair import RepairConfig
from hf_repair.evaluation import default_forward
from hf_repair.retention.contrastive import (
    contrastive_finetune,
    contrastive_learning_rate,
    sample_pairs,
    token_states_module,
)
from testbed.experiments import SmallCNN
from testbed.offline_data import load_fashion_mnist

from helpers import launch_two_processes
from lora_setup import base_model, data, lora_config

CONTRASTIVE = dict(repair_disable_tqdm=True, fresh_objective="contrastive", fresh_contrastive_iterations=5,
                   fresh_contrastive_learning_rate=2e-3, batch_size=16)


@pytest.fixture(scope="module")
def images():
    try:
        full = load_fashion_mnist("train")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    order = np.random.default_rng(0).permutation(len(full))
    return full.select(order[:300]), full.select(order[300:800])


def _features(model, dataset):
    """The head's inputs (the CNN's hidden layer) on `dataset`, in eval mode."""
    kept = []
    handle = model.classifier[3].register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    with torch.no_grad():
        model.eval()(torch.as_tensor(np.asarray(dataset["pixel_values"]), dtype=torch.float32))
    handle.remove()
    return kept[0]


def _class_separation(model, dataset):
    """Mean cosine similarity of same-class pairs minus that of different-class pairs."""
    x = F.normalize(_features(model, dataset), dim=-1)
    labels = torch.as_tensor(np.asarray(dataset["labels"]))
    similarity, same = x @ x.t(), labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return float(similarity[same & off_diagonal].mean() - similarity[~same].mean())


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=40).filter(lambda ls: len(set(ls)) > 1),
       iterations=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_each_sample_gets_one_partner_of_its_label_and_one_of_another_per_iteration(labels, iterations, seed):
    labels = np.array(labels)
    pairs = sample_pairs(labels, iterations, seed)
    assert pairs.shape == (2 * iterations * len(labels), 3)
    first, second, same = pairs.T
    assert np.array_equal(np.bincount(first, minlength=len(labels)), np.full(len(labels), 2 * iterations))
    assert np.array_equal(same, (labels[first] == labels[second]).astype(same.dtype))
    assert same.sum() == iterations * len(labels)  # half the pairs share a label, whatever the class sizes
    assert np.array_equal(pairs, sample_pairs(labels, iterations, seed))


def test_pairs_need_two_labels():
    with pytest.raises(ValueError, match="at least two labels"):
        sample_pairs(np.zeros(10, dtype=int), 2, 0)


def test_the_body_learns_to_pull_classes_apart_on_unseen_images_and_the_head_is_left_alone(images):
    verified, unseen = images
    torch.manual_seed(0)
    model = SmallCNN(width=16).eval()
    head = model.classifier[3]
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    body_before = model.features[0].weight.clone()
    separation_before = _class_separation(model, unseen)

    result = contrastive_finetune(model, head, verified, RepairConfig(**CONTRASTIVE), default_forward)

    assert result.stop_reason == "completed" and result.num_pairs == 2 * 5 * 300
    assert result.steps == int(np.ceil(result.num_pairs / 16))
    assert _class_separation(model, unseen) > separation_before + 0.2
    assert not torch.equal(model.features[0].weight, body_before)
    assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # the head was frozen for the fine-tune only
    assert not model.training  # the caller's mode comes back


def test_a_seed_makes_the_fine_tune_reproducible_and_another_seed_draws_other_pairs(images):
    verified, _ = images
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)
        model = SmallCNN(width=4)
        contrastive_finetune(model, model.classifier[3], verified.select(range(100)),
                             RepairConfig(**CONTRASTIVE), default_forward, seed=seed)
        states.append(model.state_dict())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert not all(torch.equal(v, states[2][k]) for k, v in states[0].items())


def test_a_nan_loss_restores_every_weight_and_says_so(images, caplog):
    verified, _ = images
    broken = verified.select(range(60)).map(lambda row: {"pixel_values": np.full_like(row["pixel_values"], np.nan)})
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = contrastive_finetune(model, model.classifier[3], broken, RepairConfig(**CONTRASTIVE), default_forward)
    assert result.stop_reason == "nan_loss" and result.steps == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "NaN or inf" in caplog.text


def test_a_model_with_nothing_trainable_outside_its_head_is_refused(images):
    verified, _ = images
    model = SmallCNN(width=4)
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier[3].requires_grad_(True)
    with pytest.raises(ValueError, match="no trainable parameters outside its head that"):
        contrastive_finetune(model, model.classifier[3], verified.select(range(30)), RepairConfig(**CONTRASTIVE),
                             default_forward)
    assert all(p.requires_grad for p in model.classifier[3].parameters())


@pytest.mark.parametrize("features, pooler_moves", [("auto", False), ("token_mean", False), ("head_inputs", True)])
def test_a_text_model_pairs_its_mean_token_states_unless_told_to_pair_head_inputs(features, pooler_moves):
    """A model that reads token ids pairs its backbone's token states averaged over the attention mask, which the
    pooler the head reads never sees: it is left as it was (and DDP is not kept waiting for its gradient)."""
    model = base_model("bert").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RepairConfig(**dict(CONTRASTIVE, fresh_contrastive_features=features))
    result = contrastive_finetune(model, model.classifier, data("bert", 60, seed=2, noise=0.0), config, default_forward)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert result.stop_reason == "completed" and "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert any(k.startswith("bert.pooler.") for k in moved) == pooler_moves
    assert not any(k.startswith("classifier.") for k in moved)


def test_token_states_come_from_the_backbone_of_a_transformers_model_and_of_a_peft_model():
    bert = base_model("bert")
    assert token_states_module(bert) is bert.bert
    peft_model = get_peft_model(base_model("bert"), lora_config("bert"))
    assert token_states_module(peft_model) is peft_model.get_base_model().bert
    with pytest.raises(ValueError, match="has none; use 'head_inputs'"):
        token_states_module(SmallCNN(width=4))


def test_a_lora_adapter_pairs_at_ten_times_a_full_fine_tunes_learning_rate_unless_one_is_named():
    peft_model = get_peft_model(base_model("bert"), lora_config("bert"))
    assert contrastive_learning_rate(RepairConfig(), base_model("bert")) == 5e-5
    assert contrastive_learning_rate(RepairConfig(), peft_model) == 5e-4
    assert contrastive_learning_rate(RepairConfig(fresh_contrastive_learning_rate=1e-4), peft_model) == 1e-4


@pytest.mark.parametrize("overrides, message", [
    (dict(fresh_objective="triplet"), "fresh_objective must be one of"),
    (dict(fresh_contrastive_iterations=0), "fresh_contrastive_iterations must be a whole number"),
    (dict(fresh_contrastive_iterations=2.5), "fresh_contrastive_iterations must be a whole number"),
    (dict(fresh_contrastive_learning_rate=0.0), "fresh_contrastive_learning_rate must be positive"),
    (dict(fresh_contrastive_features="cls"), "fresh_contrastive_features must be one of"),
])
def test_bad_contrastive_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        RepairConfig(**overrides)


def test_two_processes_shard_the_pairs_and_end_with_identical_weights(tmp_path):
    """A text model pairs token states, so its pooler gets no gradient: frozen, it does not stall DDP."""
    launch_two_processes("distributed_contrastive.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert ranks[0]["changed"] and not ranks[0]["frozen_changed"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == int(np.ceil(2 * 2 * 151 / (8 * 2)))
