"""method="auto" on a LoRA fine-tune: the trajectory read from a Trainer's adapter checkpoints."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

peft = pytest.importorskip("peft")

from hf_repair import RepairConfig, Repairer  # noqa: E402
from hf_repair.modeling.lora import has_lora_factors  # noqa: E402
from hf_repair.trajectory import CandidateBuilder  # noqa: E402
from hf_repair.trajectory.checkpoints import list_checkpoints, read_checkpoint  # noqa: E402

from lora_setup import base_model, base_state, data, lora_config  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA fine-tune checkpointed every epoch (adapter_model.safetensors per checkpoint) and its final model."""
    out = tmp_path_factory.mktemp("lora_run")
    torch.manual_seed(0)
    model = peft.get_peft_model(base_model("vit"), lora_config("vit"))
    args = TrainingArguments(output_dir=str(out), use_cpu=True, num_train_epochs=3, per_device_train_batch_size=16,
                             learning_rate=1e-2, report_to="none", save_strategy="epoch", save_only_model=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data("vit", 96, seed=1)).train()
    return out, model.eval()


def accuracy(model, dataset):
    with torch.no_grad():
        return float((model.eval()(pixel_values=dataset[:]["pixel_values"]).logits.argmax(-1)
                      == dataset[:]["labels"]).double().mean())


def test_adapter_checkpoints_are_read_onto_the_models_base(run):
    out, model = run
    own = {k: v.clone() for k, v in model.state_dict().items()}
    first = list_checkpoints(str(out))[0]
    state = read_checkpoint(first, model)
    saved = peft.PeftModel.from_pretrained(base_model("vit"), first).state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert any(not torch.equal(state[k], own[k]) for k in own)  # an earlier epoch's adapter...
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())  # ...and the model left as it was


def test_auto_scores_every_adapter_checkpoint_and_keeps_the_base(run):
    out, model = run
    verified = data("vit", 90, seed=2, noise=0.0)
    frozen = base_state(model)
    expected = [accuracy(peft.PeftModel.from_pretrained(base_model("vit"), c), verified) for c in list_checkpoints(str(out))]
    result = Repairer(model, RepairConfig(method="auto", seed=0, repair_disable_tqdm=True)).repair(
        verified, checkpoints=str(out))
    points = result.metrics["trajectory"]  # the last checkpoint holds the final weights: one point
    assert [p["accuracy"] for p in points] == pytest.approx(expected) and points[-1]["final"]
    assert result.metrics["peft_adapter_saveable"] is True
    assert all(torch.equal(v, frozen[k]) for k, v in base_state(model).items())


def test_the_recorded_trajectory_holds_the_frozen_base_once():
    """RepairCallback's in-memory points of a LoRA fine-tune, and the initial weights it keeps for retrain, hold only
    the adapter (and modules_to_save); the base is held once, and every point's weights read back whole."""
    from hf_repair.evaluation import default_forward, split_verified
    from hf_repair.trajectory.recorder import TrajectoryRecorder

    model = peft.get_peft_model(base_model("vit"), lora_config("vit"))
    split = split_verified(model, data("vit", 30, seed=2), RepairConfig(batch_size=16, num_folds=3))
    recorder = TrajectoryRecorder(model, split, default_forward, keep=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    recorder.record_initial()  # as RepairCallback does at train begin, for the retrain refinement
    states = []
    for epoch in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.01 * (epoch + 1))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        recorder.record(step=epoch, epoch=float(epoch))
    trajectory = recorder.trajectory
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(trajectory.shared) == set(base_state(model))  # exactly the frozen base
    for index, state in enumerate(states):
        assert set(trajectory.points[index].weights) == set(state) - set(trajectory.shared)
        assert trainable <= set(trajectory.points[index].weights)
        assert_same(trajectory.weights(index), state)
    assert set(trajectory.initial) == set(initial) - set(trajectory.shared)  # the initial adapter and head only
    assert_same(trajectory.initial_weights(), initial)
    trajectory.release_weights()
    assert trajectory.initial is None


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fold_runs_of_a_lora_adapter_are_not_averaged(run):
    """The mean of runs' factors A and B is not the mean of their products: auto refits a LoRA adapter instead."""
    _, model = run
    assert has_lora_factors(model) and not has_lora_factors(base_model("vit")) and not has_lora_factors(None)
    assert not CandidateBuilder(model, None, None, None, RepairConfig(method="auto"), None).averages_fold_runs
