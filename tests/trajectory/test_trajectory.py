"""Method "auto": the training trajectory recorded by RepairCallback, or read from checkpoints, chosen among by
nested held-out verified folds. Real data: an MLP memorising Fashion-MNIST with 40% symmetric label noise."""

import dataclasses
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from trajectory_setup import MLP, noisy_fashion_mnist, rigged_heldout_predictions  # noqa: E402
from transformers import Trainer, TrainingArguments

from hf_repair import RepairCallback, RepairConfig, Repairer
from hf_repair.retention import RetentionRepair
from hf_repair.trajectory import (
    CandidateBuilder,
    Trajectory,
    TrajectoryPoint,
    averaging,
    candidates,
    list_checkpoints,
    read_checkpoint,
)
from testbed.experiments import evaluate_accuracy, small_vit
from testbed.offline_data import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")),
    reason="needs Fashion-MNIST: apt-get update && apt-get install -y dataset-fashion-mnist",
)
EPOCHS = 20
AUTO = RepairConfig(method="auto", seed=0, alphas=[10.0, 1e3], repair_disable_tqdm=True)


@pytest.fixture(scope="module")
def data():
    return *noisy_fashion_mnist(), load_fashion_mnist("test").select(range(2000))


def trainer_for(model, train, output_dir, epochs=EPOCHS, eval_dataset=None, **overrides):
    args = dict(output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=64,
                learning_rate=3e-3, lr_scheduler_type="constant", save_strategy="epoch", report_to=[],
                disable_tqdm=True, use_cpu=True, seed=0, logging_strategy="no")
    return Trainer(model=model, args=TrainingArguments(**{**args, **overrides}), train_dataset=train,
                   eval_dataset=eval_dataset)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Train long enough to memorise the noise, with RepairCallback(method="auto") attached."""
    train, verified, _ = data
    output_dir = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    model = MLP()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = trainer_for(model, train, output_dir)
    callback = RepairCallback(AUTO, verified, write_report=False).attach(trainer)
    trainer.train()
    assert callback.error is None
    return model, callback, trainer, output_dir, initial


def fresh_final_model(output_dir):
    model = MLP()
    model.load_state_dict(read_checkpoint(list_checkpoints(output_dir)[-1]))
    return model


def assert_same_state(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fashion_mnist
def test_auto_ends_above_the_final_model_and_the_best_trajectory_point(data, run):
    _, _, test = data
    model, callback, trainer, output_dir, _ = run
    m = callback.result.metrics
    assert callback.result.adopted and m["chosen"] not in ("final", "best")
    heldout = m["heldout_accuracy"]
    assert heldout[m["chosen"]] > heldout["final"] + 0.1  # memorisation cost the final weights that much
    assert heldout[m["chosen"]] >= heldout["best"]  # early stopping, judged the same nested way
    assert m["significant"] and m["gain_ci"][0] > 0 and m["accuracy_after"] == heldout[m["chosen"]]
    assert m["significance_level"] == 0.2  # auto's own level (auto_significance_level), not significance_level's 0.05

    trajectory = m["trajectory"]
    assert [p["step"] for p in trajectory] == [32 * e for e in range(1, EPOCHS + 1)]
    assert [p["final"] for p in trajectory] == [False] * (EPOCHS - 1) + [True]  # the last epoch is the final model
    assert trajectory[-1]["accuracy"] == m["accuracy_before"]

    # On test data that nothing was chosen on: above the final weights, and at least what early stopping on the
    # verified split (load_best_model_at_end with the verified split as eval set) would have given.
    repaired = evaluate_accuracy(model, test)
    early_stopping = MLP()
    best_point = int(np.argmax([p["accuracy"] for p in trajectory]))
    early_stopping.load_state_dict(read_checkpoint(list_checkpoints(output_dir)[best_point]))
    assert repaired > evaluate_accuracy(fresh_final_model(output_dir), test) + 0.1
    assert repaired >= evaluate_accuracy(early_stopping, test)

    logged = next(e for e in trainer.state.log_history if "repair/chosen" in e)
    assert logged["repair/chosen"] == m["chosen"] and logged["repair/gain"] == pytest.approx(m["gain"])
    assert callback.trajectory is not None and all(p.weights is None for p in callback.trajectory.points)


@needs_fashion_mnist
@pytest.mark.parametrize("given", ["output_dir", "state_dicts"])
def test_offline_from_checkpoints_makes_the_callbacks_choice(data, run, given):
    train, verified, _ = data
    model, callback, _, output_dir, initial = run
    folders = list_checkpoints(output_dir)
    checkpoints = str(output_dir) if given == "output_dir" else [read_checkpoint(f) for f in folders]
    offline = fresh_final_model(output_dir)
    # the callback fine-tunes its erase refinement with the Trainer's training set, learning rate and batch size
    config = dataclasses.replace(AUTO, retention_learning_rate=3e-3, retention_batch_size=64)
    result = Repairer(offline, config).repair(verified, train, checkpoints=checkpoints, initial_weights=initial)
    m, expected = result.metrics, callback.result.metrics
    for key in ("chosen", "candidate", "heldout_accuracy", "gain", "gain_ci", "p_value", "chosen_points"):
        assert m[key] == expected[key], key
    assert [p["accuracy"] for p in m["trajectory"]] == [p["accuracy"] for p in expected["trajectory"]]
    assert_same_state(offline.state_dict(), model.state_dict())
    result.undo()
    assert_same_state(offline.state_dict(), read_checkpoint(folders[-1]))


@needs_fashion_mnist
def test_without_checkpoints_auto_weighs_refinements_of_the_final_weights(data, run):
    _, verified, _ = data
    _, _, _, output_dir, _ = run
    model = fresh_final_model(output_dir)
    result = Repairer(model, AUTO).repair(verified)
    m = result.metrics
    assert len(m["trajectory"]) == 1 and m["trajectory"][0]["final"]
    assert set(m["heldout_accuracy"]) == {"final", "best", "average", "soup", "final+head_refit", "final+projection"}
    assert m["chosen"] == "final+head_refit" and result.adopted  # the memorised head is worth refitting
    assert "train_dataset" in m["skipped"]["erase"]  # no training data: no erase refinement
    assert "train_dataset" in m["skipped"]["retrain"]

    # auto_significance_level=None: auto's gate runs at significance_level, like every other method's
    strict = dataclasses.replace(AUTO, auto_significance_level=None, significance_level=1e-300)
    refused = Repairer(fresh_final_model(output_dir), strict).repair(verified)
    assert refused.metrics["significance_level"] == 1e-300 and refused.metrics["candidate"] == "final+head_refit"
    assert not refused.adopted and refused.metrics["p_value"] > 1e-300


@needs_fashion_mnist
def test_retrain_starts_again_from_the_initial_weights_without_the_flagged_samples(data, run):
    """The callback kept the weights training started from; retraining from them without the samples the
    memorising model flags ends far above that model on held-out verified folds and on test."""
    train, verified, _ = data
    _, callback, _, output_dir, _ = run
    heldout = callback.result.metrics["heldout_accuracy"]
    base = next(name.split("+")[0] for name in heldout if name.endswith("+retrain"))
    assert heldout[f"{base}+retrain"] > heldout["final"] + 0.1

    config = repairs_from_the_initial_weights("retrain", data, run)
    missing = Repairer(fresh_final_model(output_dir), config).repair(verified, train)
    assert not missing.adopted and "initial_weights" in missing.metrics["skipped"]["retrain"]


def repairs_from_the_initial_weights(refinement, data, run):
    """auto offline with `refinement` alone, on the run's final weights and the weights it started from: the
    refinement is chosen and ends far above the memorising model on test. Returns the config."""
    train, verified, test = data
    _, _, _, output_dir, initial = run
    offline = fresh_final_model(output_dir)
    config = dataclasses.replace(AUTO, auto_candidates=[refinement], retention_learning_rate=3e-3,
                                 retention_batch_size=64, min_improvement=0.05)
    m = Repairer(offline, config).repair(verified, train, initial_weights=initial).metrics
    assert set(m["heldout_accuracy"]) == {"final", f"final+{refinement}"} and m["chosen"] == f"final+{refinement}"
    assert evaluate_accuracy(offline, test) > evaluate_accuracy(fresh_final_model(output_dir), test) + 0.1
    return config


@needs_fashion_mnist
def test_forward_learns_every_training_label_through_the_estimated_noise_transition(data, run):
    """"forward" drops no sample: it retrains from the initial weights on all of them through the noise transition
    the final model's identification estimates (about 0.6 on the diagonal at 40% symmetric noise), and ends far
    above the memorising model on test."""
    train, verified, _ = data
    transition = np.array(Repairer(fresh_final_model(run[3]), AUTO).identify(train, verified)
                          .summary["noise_transition"])
    assert transition.shape == (10, 10) and np.allclose(transition.sum(1), 1.0)
    assert abs(transition.diagonal().mean() - 0.6) < 0.1, transition.diagonal()
    repairs_from_the_initial_weights("forward", data, run)


@needs_fashion_mnist
def test_reweight_learns_every_training_label_at_the_probability_that_it_is_right(data, run, monkeypatch):
    """"reweight" drops no sample: it retrains from the initial weights on all of them, each weighed by the probability
    that its label is right under the identifying probe and the estimated noise transition. Those weights are far
    lower on the corrupted labels than on the clean ones, and the repair ends far above the memorising model."""
    train, _, _ = data
    weights = []
    finetune = candidates.repair_with_finetuning

    def spy(model, config, *args, training_weights=None, **kwargs):
        weights.append(training_weights)
        return finetune(model, config, *args, training_weights=training_weights, **kwargs)

    monkeypatch.setattr(candidates, "repair_with_finetuning", spy)
    repairs_from_the_initial_weights("reweight", data, run)
    clean = load_fashion_mnist("train").select(range(len(train)))["labels"]  # noisy_fashion_mnist's first rows
    corrupted = np.asarray(train["labels"]) != np.asarray(clean)
    assert abs(corrupted.mean() - 0.4) < 0.05
    assert weights and all(w is not None and w.shape == (len(train),) for w in weights)
    for w in weights:
        assert 0.0 <= w.min() and w.max() <= 1.0
        assert w[~corrupted].mean() > w[corrupted].mean() + 0.3, (w[~corrupted].mean(), w[corrupted].mean())


@needs_fashion_mnist
def test_forward_refitted_on_fresh_learns_through_the_transition_fresh_fold_models_calibrate(data, run, monkeypatch):
    """A chosen forward on `fresh`, refitted on every verified sample, learns through the transition fresh's fold
    models calibrate on the folds they did not learn (near the true 0.6 on the diagonal, recorded in the metrics),
    not fresh's own probe's, which reads features fitted to the verified samples; the judged fold runs keep their
    fold fresh's own. Here fresh leads the folds by one sample each: its refinement is taken and its lead recorded."""
    train, verified, _ = data
    _, _, _, output_dir, initial = run
    transitions = []  # the transition of every forward fine-tune
    finetune = candidates.repair_with_finetuning

    def spy(model, config, *args, noise_transition=None, **kwargs):
        transitions.append(noise_transition)
        return finetune(model, config, *args, noise_transition=noise_transition, **kwargs)

    monkeypatch.setattr(candidates, "repair_with_finetuning", spy)
    rigged = rigged_heldout_predictions("fresh+forward", fresh_leads=True)
    monkeypatch.setattr(CandidateBuilder, "heldout_predictions", rigged)
    config = dataclasses.replace(AUTO, auto_candidates=["fresh", "forward"], retention_learning_rate=3e-3,
                                 retention_batch_size=64, runs_per_fold=1)
    m = Repairer(fresh_final_model(output_dir), config).repair(verified, train, initial_weights=initial).metrics
    assert m["chosen"] == "fresh+forward" and m["adopted"]
    assert (m["fresh_over_candidate"]["wins"], m["fresh_over_candidate"]["losses"]) == (config.num_folds, 0)
    calibrated = torch.tensor(m["fresh_noise_rate"]["transition"], dtype=torch.float32)
    on_fresh = transitions[config.num_folds:]  # after final+forward's fold runs (the final model's own transition)
    assert len(on_fresh) == 2 * config.num_folds  # its fold runs, then the refit on every verified sample
    assert all(torch.equal(t, calibrated) for t in on_fresh[config.num_folds:])
    assert not any(torch.equal(t, calibrated) for t in transitions[:2 * config.num_folds])
    assert abs(m["fresh_noise_rate"]["rate"] - 0.4) < 0.1 and abs(calibrated.diagonal().mean() - 0.6) < 0.1


@needs_fashion_mnist
def test_fresh_fine_tunes_the_initial_weights_on_the_verified_samples_alone(data, run):
    """"fresh" needs no training data and ignores the final weights: from two different final models it builds the
    same weights, and it is judged like every procedure, on held-out folds it was not fine-tuned on."""
    _, verified, test = data
    _, callback, _, output_dir, initial = run
    assert "fresh" in callback.result.metrics["heldout_accuracy"]  # the callback kept the initial weights for it
    config = dataclasses.replace(AUTO, auto_candidates=["fresh"], retention_learning_rate=3e-3,
                                 retention_batch_size=64)
    final, perturbed = fresh_final_model(output_dir), fresh_final_model(output_dir)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    results = [Repairer(model, config).repair(verified, initial_weights=initial) for model in (final, perturbed)]
    m = results[0].metrics
    assert set(m["heldout_accuracy"]) == {"final", "fresh"} and m["chosen"] == "fresh" and m["chosen_points"] == []
    assert m["heldout_accuracy"]["fresh"] == results[1].metrics["heldout_accuracy"]["fresh"]
    assert_same_state(final.state_dict(), perturbed.state_dict())
    assert evaluate_accuracy(final, test) > evaluate_accuracy(fresh_final_model(output_dir), test)

    missing = Repairer(fresh_final_model(output_dir), config).repair(verified)
    assert not missing.adopted and "initial_weights" in missing.metrics["skipped"]["fresh"]

    # where fresh beats the trajectory's best base, the refinements are judged on top of both
    both = dataclasses.replace(config, auto_candidates=["fresh", "head_refit"])
    judged = Repairer(fresh_final_model(output_dir), both).repair(verified, initial_weights=initial).metrics
    assert judged["heldout_accuracy"]["fresh"] > judged["heldout_accuracy"]["final"]
    assert set(judged["heldout_accuracy"]) == {"final", "fresh", "final+head_refit", "fresh+head_refit"}


@needs_fashion_mnist
def test_a_contrastive_fresh_trains_the_body_on_pairs_then_refits_the_head(data, run, monkeypatch):
    """fresh_objective="contrastive" replaces fresh's cross-entropy fine-tune (never called) by the pair objective
    on the body and a head refitted on the same samples: judged on the folds like any fresh, above the final
    weights there and on test, and the same weights again from the same seed."""
    _, verified, test = data
    _, _, _, output_dir, initial = run
    monkeypatch.setattr(RetentionRepair, "run_on_verified", lambda *a, **k: pytest.fail("cross-entropy fresh ran"))
    config = dataclasses.replace(AUTO, auto_candidates=["fresh"], retention_batch_size=64, runs_per_fold=1,
                                 fresh_objective="contrastive", fresh_contrastive_iterations=2,
                                 fresh_contrastive_learning_rate=1e-3)
    models = [fresh_final_model(output_dir) for _ in range(2)]
    results = [Repairer(model, config).repair(verified, initial_weights=initial) for model in models]
    m = results[0].metrics
    assert m["chosen"] == "fresh" and m["heldout_accuracy"]["fresh"] > m["heldout_accuracy"]["final"] + 0.1
    assert evaluate_accuracy(models[0], test) > evaluate_accuracy(fresh_final_model(output_dir), test) + 0.1
    assert_same_state(models[0].state_dict(), models[1].state_dict())
    for key in ("body.1.weight", "head.weight"):  # both moved from where training started
        assert not torch.equal(models[0].state_dict()[key], initial[key])


@needs_fashion_mnist
def test_fresh_keeps_each_runs_lowest_loss_learning_rate_and_ends_with_runs_on_every_sample(data, run, monkeypatch):
    """Each fresh fine-tune runs at every learning rate scale and keeps the one with the lowest inner held-out loss;
    the folds judge averages of runs_per_fold runs, and the weights on every sample average runs_per_fold more, on
    every verified sample."""
    _, verified, _ = data
    _, _, _, output_dir, initial = run
    runs = []  # (learning rate, inner held-out loss, weights, verified samples) of every fresh fine-tune, in order
    run_on_verified = RetentionRepair.run_on_verified

    def spy(self, verified, *args, **kwargs):
        result = run_on_verified(self, verified, *args, **kwargs)
        state = {key: value.clone() for key, value in self.model.state_dict().items()}
        runs.append((self.config.retention_learning_rate, result.scores_after["loss"], state, len(verified)))
        return result

    monkeypatch.setattr(RetentionRepair, "run_on_verified", spy)
    config = dataclasses.replace(AUTO, auto_candidates=["fresh"], retention_learning_rate=3e-3,
                                 retention_batch_size=64, fresh_learning_rate_scales=[1.0, 0.1])
    model = fresh_final_model(output_dir)
    assert Repairer(model, config).repair(verified, initial_weights=initial).metrics["chosen"] == "fresh"
    finetunes = (config.num_folds + 1) * config.runs_per_fold  # each at both learning rates
    assert [learning_rate for learning_rate, _, _, _ in runs] == pytest.approx([3e-3, 3e-4] * finetunes)
    on_every_sample = [size == len(verified) for *_, size in runs]  # the last runs_per_fold, at both learning rates
    assert on_every_sample == [False] * (len(runs) - 2 * config.runs_per_fold) + [True] * 2 * config.runs_per_fold
    kept = [min(runs[2 * i: 2 * i + 2], key=lambda r: r[1])[2] for i in range(finetunes)][-config.runs_per_fold:]
    for key, value in model.state_dict().items():
        expected = sum(state[key].double() for state in kept) / len(kept)
        torch.testing.assert_close(value, expected.to(value.dtype))
    assert not any(torch.equal(model.state_dict()["head.weight"], state["head.weight"]) for _, _, state, _ in runs)


def record_finetunes(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The weights after every erase or retrain fine-tune `auto` runs, in order (filled as they run)."""
    runs = []
    finetune = candidates.repair_with_finetuning

    def spy(model, *args, **kwargs):
        result = finetune(model, *args, **kwargs)
        runs.append({key: value.clone() for key, value in model.state_dict().items()})
        return result

    monkeypatch.setattr(candidates, "repair_with_finetuning", spy)
    return runs


@needs_fashion_mnist
def test_erase_and_retrain_end_with_the_average_of_their_judged_fold_runs(data, run, monkeypatch):
    """No fine-tune on every verified sample after the choice: the weights are the mean of the chosen refinement's
    fold runs, the ones the held-out folds judged."""
    train, verified, _ = data
    _, _, _, output_dir, initial = run
    runs = record_finetunes(monkeypatch)  # erase's folds, then retrain's
    config = dataclasses.replace(AUTO, auto_candidates=["erase", "retrain"], retention_learning_rate=3e-3,
                                 retention_batch_size=64)
    model = fresh_final_model(output_dir)
    m = Repairer(model, config).repair(verified, train, initial_weights=initial).metrics
    k = config.num_folds * config.runs_per_fold
    assert len(runs) == 2 * k and m["chosen"] in ("final+erase", "final+retrain")
    chosen = runs[:k] if m["chosen"] == "final+erase" else runs[k:]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, (sum(state[key].double() for state in chosen) / k).to(value.dtype),
                                   rtol=0, atol=0)
    assert not any(torch.equal(model.state_dict()["head.weight"], state["head.weight"]) for state in runs)
    check = m["fold_run_averages"][m["chosen"]]
    assert check["kept"] and check["verified_accuracy"] >= check["heldout_accuracy"] == m["heldout_accuracy"][m["chosen"]]


@needs_fashion_mnist
@pytest.mark.parametrize("overrides, retrain, forward", [
    (dict(), (1.0, 10.0), (0.0, 3.0)),  # the defaults: images mix, for a longer budget; forward's gated rows never
    (dict(retrain_mixup_alpha=0.4, retrain_epochs=2.0), (0.4, 2.0), (0.0, 2.0)),
    (dict(retrain_mixup_alpha=0.0), (0.0, 3.0), (0.0, 3.0)),
    (dict(retrain_small_loss_trim=0.1), (0.0, 3.0), (0.0, 3.0)),  # trimmed rows cannot mix
])
def test_retrain_mixup_alpha_and_its_budget_reach_the_retrain_alone(data, run, monkeypatch, overrides, retrain,
                                                                     forward):
    """retrain_mixup_alpha mixes the retrain's batches (by default where the inputs are floating point, as these
    images are) and sets its default budget; erase keeps mixup_alpha and forward never mixes."""
    train, verified, _ = data
    _, _, _, output_dir, initial = run
    seen = []  # (it starts from the initial weights, mixup_alpha, budget) of every fine-tune, none of them run
    monkeypatch.setattr(candidates, "repair_with_finetuning", lambda model, config, *args, **kwargs: seen.append(
        (torch.equal(model.state_dict()["head.weight"], initial["head.weight"]), config.mixup_alpha,
         config.retention_epochs)))
    config = dataclasses.replace(AUTO, auto_candidates=["erase", "retrain", "forward"], runs_per_fold=1,
                                 mixup_alpha=0.2, retention_epochs=1.5, **overrides)
    Repairer(fresh_final_model(output_dir), config).repair(verified, train, initial_weights=initial)
    k = config.num_folds
    assert seen == [(False, 0.2, 1.5)] * k + [(True, *retrain)] * k + [(True, *forward)] * k


@needs_fashion_mnist
def test_several_runs_per_fold_are_judged_by_their_average_and_all_are_averaged_at_the_end(data, run, monkeypatch):
    """runs_per_fold=2: each fold fine-tunes twice with its own seeds, predicts its held-out samples with the average
    of its two runs, and the weights auto ends with are the average of all 2k runs."""
    train, verified, _ = data
    _, _, _, output_dir, initial = run
    runs = record_finetunes(monkeypatch)
    predicted_with = []  # the head's weight at each held-out prediction after a fine-tune
    predict = candidates.predict

    def spy(model, *args, **kwargs):
        predicted_with.append(model.state_dict()["head.weight"].clone())
        return predict(model, *args, **kwargs)

    monkeypatch.setattr(candidates, "predict", spy)
    config = dataclasses.replace(AUTO, auto_candidates=["retrain"], retention_learning_rate=3e-3,
                                 retention_batch_size=64, runs_per_fold=2)
    model = fresh_final_model(output_dir)
    m = Repairer(model, config).repair(verified, train, initial_weights=initial).metrics
    k = config.num_folds
    assert m["chosen"] == "final+retrain" and len(runs) == 2 * k and len(predicted_with) == k
    mean = lambda states, key: (sum(state[key].double() for state in states) / len(states)).float()  # noqa: E731
    for fold in range(k):
        first, second = runs[2 * fold], runs[2 * fold + 1]
        assert not torch.equal(first["head.weight"], second["head.weight"])  # two seeds, two runs
        torch.testing.assert_close(predicted_with[fold], mean([first, second], "head.weight"), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, mean(runs, key), rtol=0, atol=0)


@needs_fashion_mnist
def test_a_refinement_of_fresh_is_refitted_on_every_verified_sample(data, run, monkeypatch):
    """fresh+erase, once chosen, is identified again by fresh on every verified sample and ends with the average of
    num_folds erase runs from it on all of them, not with its fold runs (whose fresh learnt two thirds of them).
    The metrics say what share of the refit's flags are likely wrong labels, as fresh's fold models estimate it."""
    train, verified, _ = data
    _, _, _, output_dir, initial = run
    starts, seeds, runs, flags = [], [], [], []  # per erase fine-tune: the head it started from, its seed, its
    # weights after, the training samples it dropped
    finetune, identify = candidates.repair_with_finetuning, candidates.identify_harmful
    identified_on = []  # how many verified samples each identification's probe learnt

    def spy_finetune(model, finetune_config, *args, **kwargs):
        starts.append(model.state_dict()["head.weight"].clone())
        seeds.append(finetune_config.repair_seed)
        flags.append(args[2].flagged_indices)
        result = finetune(model, finetune_config, *args, **kwargs)
        runs.append({key: value.clone() for key, value in model.state_dict().items()})
        return result

    def spy_identify(model, train_dataset, verified_samples, *args, **kwargs):
        identified_on.append(len(verified_samples))
        return identify(model, train_dataset, verified_samples, *args, **kwargs)

    monkeypatch.setattr(candidates, "repair_with_finetuning", spy_finetune)
    monkeypatch.setattr(candidates, "identify_harmful", spy_identify)
    monkeypatch.setattr(CandidateBuilder, "heldout_predictions", rigged_heldout_predictions("fresh+erase"))
    config = dataclasses.replace(AUTO, auto_candidates=["fresh", "erase"], retention_learning_rate=3e-3,
                                 retention_batch_size=64)
    model = fresh_final_model(output_dir)
    m = Repairer(model, config).repair(verified, train, initial_weights=initial).metrics
    k, per_fold = config.num_folds, config.num_folds * config.runs_per_fold
    assert m["chosen"] == "fresh+erase" and "fresh+erase" not in m.get("fold_run_averages", {})
    assert len(runs) == 2 * per_fold + k  # final+erase's and fresh+erase's fold runs, then the refit
    assert len(identified_on) == 2 * k + 1 and identified_on[-1] == len(verified) > max(identified_on[:-1])
    refit = runs[-k:]
    assert all(torch.equal(start, starts[-k]) for start in starts[-k:])  # every refit run starts from one fresh
    assert not any(torch.equal(starts[-k], start) for start in starts[:-k])  # not a fold's fresh
    assert seeds[-k:] == [config.repair_seed + 1000 * run for run in range(k)]  # each its own seed
    # the refit flags the share fresh's fold models calibrate; the judged fold runs their own identification's
    assert {len(f) for f in flags[-k:]} == {round(m["fresh_noise_rate"]["rate"] * len(train))}
    assert round(m["fresh_noise_rate"]["rate"] * len(train)) not in {len(f) for f in flags[:-k]}
    clean = load_fashion_mnist("train").select(range(len(train)))["labels"]  # noisy_fashion_mnist's first rows
    corrupted = np.asarray(train["labels"]) != np.asarray(clean)
    estimated = m["fresh_identification"]
    assert estimated["flag_precision_source"] == "fresh_fold_models" and estimated["num_flagged"] == len(flags[-1])
    low, high = estimated["estimated_flag_precision_interval"]
    assert low <= estimated["estimated_flag_precision"] <= high
    assert abs(estimated["estimated_flag_precision"] - corrupted[flags[-1]].mean()) < 0.1, corrupted[flags[-1]].mean()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, (sum(state[key].double() for state in refit) / k).to(value.dtype),
                                   rtol=0, atol=0)


@needs_fashion_mnist
def test_an_average_below_its_runs_held_out_accuracy_is_replaced_by_one_more_fine_tune(data, run, monkeypatch):
    """Fold runs that do not average (a loss barrier between them): the average is checked on the verified samples
    and, below the runs' held-out accuracy, replaced by a fine-tune on every verified sample."""
    train, verified, _ = data
    _, _, _, output_dir, initial = run
    runs = record_finetunes(monkeypatch)
    average = averaging.FoldRunSum.average

    def broken(self, shared):  # an average that lost what the runs learnt: its head predicts one class
        return {**average(self, shared), "head.weight": torch.zeros(10, 64), "head.bias": torch.arange(10.0)}

    monkeypatch.setattr(averaging.FoldRunSum, "average", broken)
    # one run per fold: a fold's own average would break too, and the folds must still judge erase well
    config = dataclasses.replace(AUTO, auto_candidates=["erase"], retention_learning_rate=3e-3, retention_batch_size=64,
                                 runs_per_fold=1)
    model = fresh_final_model(output_dir)
    m = Repairer(model, config).repair(verified, train, initial_weights=initial).metrics
    assert m["chosen"] == "final+erase" and len(runs) == config.num_folds * config.runs_per_fold + 1
    check = m["fold_run_averages"]["final+erase"]
    assert not check["kept"] and check["verified_accuracy"] < 0.2 < check["heldout_accuracy"]
    assert_same_state(model.state_dict(), runs[-1])  # the fine-tune on every verified sample


def test_only_the_best_fine_tuning_refinement_judged_keeps_its_fold_runs():
    trajectory = Trajectory(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), keep=1)
    trajectory.add(dataclasses.replace(point([0, 0, 0, 0]), final=True))
    builder = CandidateBuilder(None, trajectory, None, None, AUTO, None)
    for procedure, accuracy in [("final+erase", 0.5), ("final+retrain", 0.5), ("average+erase", 0.75)]:
        builder._fold_runs[procedure] = averaging.FoldRunSum()
        builder.judged(procedure, accuracy)
        builder.judged("final+head_refit", 1.0)  # not a fine-tune: nothing kept, nothing dropped
    assert list(builder._fold_runs) == ["average+erase"]  # a tie keeps the first, a better one replaces it
    with pytest.raises(RuntimeError, match="were not kept"):
        builder.apply("final+retrain")


@needs_fashion_mnist
def test_undo_restores_the_final_weights(run):
    model, callback, _, output_dir, initial = run
    callback.result.undo()
    assert_same_state(model.state_dict(), read_checkpoint(list_checkpoints(output_dir)[-1]))


@needs_fashion_mnist
def test_steps_strategy_and_the_best_model_loaded_at_end(data, tmp_path):
    """Scored every 10 steps; with load_best_model_at_end the final weights are an earlier point, not a new one."""
    train, verified, _ = data
    torch.manual_seed(0)
    model = MLP()
    trainer = trainer_for(model, train.select(range(320)), tmp_path, epochs=20, save_strategy="steps", save_steps=10,
                          eval_strategy="steps", eval_steps=10, load_best_model_at_end=True, eval_dataset=verified)
    config = RepairConfig(method="auto", seed=0, trajectory_eval_strategy="steps", trajectory_eval_steps=10,
                          auto_candidates=["best", "average"], repair_disable_tqdm=True)
    callback = RepairCallback(config, verified, write_report=False).attach(trainer)
    trainer.train()
    assert callback.error is None
    trajectory = callback.result.metrics["trajectory"]
    assert [p["step"] for p in trajectory] == list(range(10, 101, 10))  # 5 steps an epoch, 20 epochs
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best_step < 100  # the eval loss rose as the model memorised: the best model is an earlier one
    assert [p["step"] for p in trajectory if p["final"]] == [best_step]


@needs_fashion_mnist
def test_a_transformers_checkpoint_is_read_as_the_model_names_its_weights(data, tmp_path):
    """save_pretrained stores a ViT's weights under its checkpoint names (query/key/value, not q_proj/k_proj/...)."""
    train, _, _ = data
    torch.manual_seed(0)
    model = small_vit(hidden_size=16, num_layers=1, heads=2)
    trainer_for(model, train.select(range(128)), tmp_path, epochs=1).train()
    folder = list_checkpoints(tmp_path)[-1]
    assert read_checkpoint(folder).keys() != model.state_dict().keys()
    assert_same_state(read_checkpoint(folder, model), model.state_dict())


def point(predictions, weights="w"):
    return TrajectoryPoint(step=None, epoch=None, predictions=torch.as_tensor(predictions), weights={"w": weights})


def test_weights_are_kept_only_while_a_ranking_can_use_them():
    labels = torch.zeros(6, dtype=torch.long)
    folds = torch.tensor([0, 0, 1, 1, 2, 2])
    trajectory = Trajectory(labels, folds, keep=1)
    for correct in ([1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]):
        trajectory.add(point([0 if c else 1 for c in correct]))
    kept = [p.weights is not None for p in trajectory.points]
    # Point 0 is best everywhere; point 2 never beats it on any fold's complement; the latest is always kept.
    assert kept == [True, False, False, True]
    with pytest.raises(RuntimeError, match="were not kept"):
        trajectory.weights(1)
    trajectory.add(point([0, 0, 0, 0, 0, 0]))  # a new best: ties go to the earlier point, which stays
    assert [p.weights is not None for p in trajectory.points] == [True, False, False, False, True]


def test_the_best_point_of_a_fold_is_chosen_without_that_fold():
    """Point 1 is best overall only thanks to fold 0: judged on fold 0, `best` must not know that."""
    labels = torch.zeros(12, dtype=torch.long)
    folds = torch.arange(12) // 4
    trajectory = Trajectory(labels, folds, keep=2)
    wrong = lambda correct: [0 if c else 1 for c in correct]  # noqa: E731
    trajectory.add(point(wrong([1, 1, 0, 0] * 3)))  # 6/12 right; 4/8 outside fold 0
    trajectory.add(point(wrong([1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0])))  # 7/12 right; 3/8 outside fold 0
    builder = CandidateBuilder(None, trajectory, None, None, AUTO, None)
    assert builder.base("best", fold=None) == (1,)
    assert builder.base("best", fold=0) == (0,)
    assert torch.equal(builder.heldout_predictions("best", fold=0), torch.tensor([0, 0, 1, 1]))


def test_the_trajectory_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="trajectory_eval_steps"):
        RepairConfig(method="auto", trajectory_eval_strategy="steps")
    with pytest.raises(ValueError, match="auto_candidates"):
        RepairConfig(method="auto", auto_candidates=["ensemble"])
    with pytest.raises(ValueError, match="method='auto' only"):
        Repairer(MLP(), RepairConfig()).repair(None, checkpoints=[])
    with pytest.raises(ValueError, match="initial_weights are used by method='auto' only"):
        Repairer(MLP(), RepairConfig()).repair(None, initial_weights={})
    with pytest.raises(ValueError, match="retrain_epochs"):
        RepairConfig(method="auto", retrain_epochs=0)
    with pytest.raises(ValueError, match="fresh_epochs must be positive"):
        RepairConfig(method="auto", fresh_epochs=0)
    for scales in ([], [1.0, 0.0]):
        with pytest.raises(ValueError, match="fresh_learning_rate_scales must be a non-empty list of positive"):
            RepairConfig(method="auto", fresh_learning_rate_scales=scales)
    for runs in (0, 1.5, True):
        with pytest.raises(ValueError, match="runs_per_fold must be a whole number of at least 1"):
            RepairConfig(method="auto", runs_per_fold=runs)
    with pytest.raises(ValueError, match=r"auto_significance_level must be in \(0, 1\) or None"):
        RepairConfig(method="auto", auto_significance_level=1.0)
    model = MLP()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"initial_weights has keys the model does not: \['encoder.weight'\]"):
        Repairer(model, AUTO).repair(None, initial_weights={"encoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"initial_weights lacks the model's weights \['body.1.weight'"):
        Repairer(model, AUTO).repair(None, initial_weights={"head.weight": torch.zeros(10, 64)})
    # a checkpoint folder is read and checked up front too, not at the retrain
    safetensors.torch.save_file({"encoder.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"initial_weights has keys the model does not: \['encoder.weight'\]"):
        Repairer(model, AUTO).repair(None, initial_weights=tmp_path)
    assert_same_state(model.state_dict(), before)


def test_a_frozen_weight_is_held_once_unless_it_changed_between_points():
    trajectory = Trajectory(torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]), keep=3)
    states = [{"base": torch.ones(2), "lora": torch.zeros(2)}, {"base": torch.ones(2), "lora": torch.ones(2)},
              {"base": 2 * torch.ones(2), "lora": torch.ones(2)}]  # the last: unfrozen, changed, frozen again
    for state in states:
        weights = trajectory.cpu_state(state, frozen={"base"})
        trajectory.add(TrajectoryPoint(step=None, epoch=None, predictions=torch.zeros(2, dtype=torch.long),
                                       weights=weights))
    assert [set(p.weights) for p in trajectory.points] == [{"lora"}, {"lora"}, {"base", "lora"}]
    for index, state in enumerate(states):
        assert_same_state(trajectory.weights(index), state)
