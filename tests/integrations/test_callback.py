"""RepairCallback inside real Trainer runs: ordering, reporting, saving, failures, flags."""

import dataclasses
import glob
import json
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_repair import RepairCallback, RepairConfig, Repairer, RepairResult
from hf_repair.integrations.callback import REPORT_DIR, RESULTS_NAME

from helpers import PadCollator, image_collate, with_image_transform

FORCE = dict(min_improvement=-1.0, significance_test="none")  # adopt the best alpha even when it does not win, so weights change
ALPHAS = [1.0, 10.0, 1e3]



def tiny_vit(num_classes=3):
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=num_classes)
    return ViTForImageClassification(config)


def tiny_bert(num_classes=2):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=num_classes)
    return BertForSequenceClassification(config)


def image_data(n, seed, num_classes=3, noise=0.3):
    """Images whose class shifts the mean of one quadrant; a `noise` share of labels is wrong."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    for i, y in enumerate(labels):
        x[i, 0, (y // 2) * 4 : (y // 2) * 4 + 4, (y % 2) * 4 : (y % 2) * 4 + 4] += 2.0
    noisy = labels.copy()
    flip = rng.random(n) < noise
    noisy[flip] = (labels[flip] + 1) % num_classes
    return datasets.Dataset.from_dict(
        {"pixel_values": x, "labels": noisy, "clean_labels": labels}
    ).with_format("torch")


def image_data_with_transform(n, seed):
    return with_image_transform(image_data(n, seed).remove_columns("clean_labels"))


def text_data(n, seed, num_classes=2):
    """Variable-length token ids whose class sets which half of the vocabulary dominates."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    ids = []
    for y in labels:
        length = int(rng.integers(4, 12))
        low, high = (3, 30) if y == 0 else (30, 60)
        ids.append(rng.integers(low, high, size=length).tolist())
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels.tolist(), "text": ["unused"] * n})



def training_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=6, per_device_train_batch_size=16,
                  learning_rate=3e-3, report_to="none", save_strategy="no", logging_steps=2, disable_tqdm=True,
                  seed=0, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


QUERY = "vit.layers.0.attention.q_proj.weight"


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def saved_weights(directory, model_class=ViTForImageClassification):
    """The state dict of a saved model or checkpoint, under the in-memory parameter names."""
    return state(model_class.from_pretrained(str(directory)))


def read_results(output_dir):
    with open(os.path.join(output_dir, RESULTS_NAME)) as f:
        return json.load(f)


def read_report(output_dir):
    """report.json of the report in output_dir, after checking the page and its summary are there."""
    directory = os.path.join(output_dir, REPORT_DIR)
    assert {"index.html", "report.json", "summary.txt"} <= set(os.listdir(directory))
    with open(os.path.join(directory, "report.json")) as f:
        return json.load(f)


def read_tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    return scalars


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_vit_trainer_repairs_and_reports_to_tensorboard(tmp_path, monkeypatch, remove_unused_columns):
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    if remove_unused_columns:  # stored pixel_values plus bookkeeping columns Trainer drops
        train, verified, collator = image_data(96, seed=1), image_data(60, seed=2, noise=0.0), None
    else:  # raw columns decoded on the fly by a transform, as in the HF image classification example
        train, verified, collator = image_data_with_transform(96, 1), image_data_with_transform(60, 2), image_collate
    config = RepairConfig(alphas=ALPHAS, label_column="labels" if remove_unused_columns else "label", **FORCE)
    model = tiny_vit()
    args = training_args(tmp_path, report_to="tensorboard", remove_unused_columns=remove_unused_columns)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    callback = RepairCallback(config, verified).attach(trainer)
    trainer.train()

    assert callback.error is None and callback.result.adopted
    metrics = callback.result.metrics
    assert metrics["num_verified"] == len(verified)
    # trainer.log: in log_history with the step ...
    entry = next(e for e in trainer.state.log_history if "repair/accuracy_after" in e)
    assert entry["step"] == trainer.state.global_step == 6
    assert entry["repair/accuracy_before"] == pytest.approx(metrics["accuracy_before"])
    assert entry["repair/alpha"] == metrics["alpha"] and entry["repair/num_verified"] == len(verified)
    # ... and in a real TensorBoard event file, next to the training loss (transformers' integrations
    # file every key that does not start with eval_/test_ under train/)
    scalars = read_tensorboard_scalars(logdir)
    assert scalars["train/repair/accuracy_after"] == [pytest.approx(metrics["accuracy_after"])]
    assert scalars["train/repair/alpha"] == [pytest.approx(metrics["alpha"])]
    assert "train/repair/time_s" in scalars and "train/loss" in scalars
    # ... and in output_dir, written atomically (no temporary file left behind), with the report
    results = read_results(args.output_dir)
    assert results["metrics"]["accuracy_after"] == pytest.approx(metrics["accuracy_after"])
    assert results["source"]["global_step"] == 6 and not glob.glob(os.path.join(args.output_dir, ".*tmp*"))
    assert results["report"] == f"{REPORT_DIR}/index.html"
    numbers = read_report(args.output_dir)
    assert numbers["metrics"] == results["metrics"] and numbers["selection"]["chosen_alpha"] == metrics["alpha"]

    # a later save_model saves the repaired weights
    repaired = state(model)
    trainer.save_model(str(tmp_path / "saved"))
    saved = saved_weights(tmp_path / "saved")
    assert all(torch.equal(saved[k], v) for k, v in repaired.items())
    callback.result.undo()
    assert not torch.equal(model.state_dict()[QUERY], saved[QUERY])


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_bert_trainer_repairs_with_the_trainers_collator(tmp_path, remove_unused_columns):
    train, verified = text_data(64, seed=1), text_data(48, seed=2)
    model = tiny_bert()
    args = training_args(tmp_path, remove_unused_columns=remove_unused_columns)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=PadCollator())
    callback = RepairCallback(RepairConfig(alphas=ALPHAS, **FORCE), verified).attach(trainer)
    trained = {}
    trainer.callback_handler.callbacks.insert(0, _SnapshotAtTrainEnd(trained))
    trainer.train()

    # The repair batched the variable-length verified split with the Trainer's own PadCollator,
    # dropped the "text" column, and equals a Repairer run on the trained weights.
    assert callback.error is None and callback.result.metrics["num_verified"] == 48
    reference = tiny_bert()
    reference.load_state_dict(trained)
    Repairer(reference, RepairConfig(alphas=ALPHAS, **FORCE), collate_fn=PadCollator()).repair(verified)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(model.state_dict()[k], trained[k]) for k in trained)


@pytest.mark.parametrize("method", ["erase", "projection+retention"])
def test_fine_tuning_methods_use_the_trainers_training_set_and_collator(tmp_path, method):
    train, verified = text_data(96, seed=1), text_data(60, seed=2)
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=12, per_device_train_batch_size=8),
                      train_dataset=train, data_collator=PadCollator())
    config = RepairConfig(method=method, score="loss", flag_rule="budget", flag_fraction=0.25, retention_epochs=1.0,
                          batch_size=16, alphas=ALPHAS)
    callback = RepairCallback(config, verified).attach(trainer)
    trained = {}
    trainer.callback_handler.callbacks.insert(0, _SnapshotAtTrainEnd(trained))
    trainer.train()

    assert callback.error is None, callback.error
    metrics = callback.result.metrics
    assert metrics["num_train"] == 96 and metrics["num_flagged"] == 24 and metrics["steps"] > 0
    assert metrics["batch_size"] == 8 and metrics["max_steps"] == 12  # the Trainer's batch size, one epoch of it
    assert metrics["accuracy_after"] >= metrics["accuracy_before"]
    logged = trainer.state.log_history[-1]
    assert logged["repair/num_flagged"] == 24 and logged["repair/steps"] == metrics["steps"]
    with open(tmp_path / "out" / RESULTS_NAME) as handle:
        saved = json.load(handle)
    assert saved["report"] == f"{REPORT_DIR}/index.html" and "report_error" not in saved
    assert saved["metrics"]["num_flagged"] == 24
    # the repair is the one a Repairer makes from the trained weights with the same data and collator, and the
    # Trainer's batch size and learning rate
    reference = tiny_bert()
    reference.load_state_dict(trained)
    fine_tune_as_trained = dataclasses.replace(config, retention_batch_size=8,
                                               retention_learning_rate=trainer.args.learning_rate)
    Repairer(reference, fine_tune_as_trained, collate_fn=PadCollator()).repair(verified, train_dataset=train)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-5)


def test_auto_keeps_the_training_set_and_initial_weights_for_forward_alone(tmp_path):
    """forward, like retrain, fine-tunes the initial weights on the training set: weighed alone, it gets both."""
    train, verified = text_data(96, seed=1), text_data(60, seed=2)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=12, per_device_train_batch_size=8),
                      train_dataset=train, data_collator=PadCollator())
    config = RepairConfig(method="auto", auto_candidates=["forward"], batch_size=16, retrain_epochs=1.0)
    callback = RepairCallback(config, verified).attach(trainer)
    trainer.train()
    assert callback.error is None, callback.error
    metrics = callback.result.metrics
    assert "skipped" not in metrics and set(metrics["heldout_accuracy"]) == {"final", "final+forward"}


def test_fine_tuning_method_without_a_training_dataset_fails_before_training(tmp_path):
    trainer = Trainer(model=tiny_vit(), args=training_args(tmp_path), train_dataset=image_data(48, seed=1).to_iterable_dataset())
    RepairCallback(RepairConfig(method="erase"), image_data(30, seed=2)).attach(trainer)
    with pytest.raises(ValueError, match=r"train_dataset=\.\.\."):
        trainer.train()
    assert trainer.state.global_step == 0


class _SnapshotAtTrainEnd(TrainerCallback):
    """Runs first at train end: the weights as trained, before the repair."""

    def __init__(self, store):
        self.store = store

    def on_train_end(self, args, train_state, control, model=None, **kwargs):
        self.store.update(state(model))


def test_repairs_the_best_model_loaded_at_end(tmp_path):
    # BERT, not ViT: transformers 5.23's _load_best_model skips the key renaming ViT checkpoints need
    # (huggingface/transformers#48805), so a ViT "best model" would be half the last one.
    evaluations = []

    def compute_metrics(eval_pred):  # the first evaluation is the best, so best != last
        evaluations.append(None)
        return {"score": -float(len(evaluations))}

    train, verified = text_data(64, seed=1), text_data(48, seed=2)
    model = tiny_bert()
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                         load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=text_data(16, seed=3),
                      data_collator=PadCollator(), compute_metrics=compute_metrics)
    config = RepairConfig(alphas=ALPHAS, **FORCE)
    callback = RepairCallback(config, verified).attach(trainer)
    trainer.train()

    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = BertForSequenceClassification.from_pretrained(trainer.state.best_model_checkpoint)
    last = saved_weights(os.path.join(args.output_dir, "checkpoint-6"), BertForSequenceClassification)
    reference = Repairer(best, config, collate_fn=PadCollator()).repair(verified)
    assert callback.result.metrics["accuracy_before"] == pytest.approx(reference.metrics["accuracy_before"])
    for name, value in best.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(model.state_dict()[query], last[query])
    assert read_results(args.output_dir)["source"]["best_model_checkpoint"] == trainer.state.best_model_checkpoint


def test_failure_at_train_end_leaves_the_trained_model_and_outputs(tmp_path, caplog):
    calls = []

    def flaky_forward(model, inputs):
        calls.append(None)
        if len(calls) > 4:  # past the check at train begin and the capture pass, during alpha scoring
            raise RuntimeError("device lost")
        return model(**inputs).logits

    train, verified = image_data(96, seed=1), image_data(60, seed=2, noise=0.0)
    model = tiny_vit()
    args = training_args(tmp_path, save_strategy="steps", save_steps=6)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    config = RepairConfig(alphas=ALPHAS, batch_size=32, **FORCE)
    callback = RepairCallback(config, verified, forward_fn=flaky_forward).attach(trainer)
    with caplog.at_level(logging.ERROR, logger="hf_repair"):
        output = trainer.train()

    assert output.global_step == 6 and isinstance(callback.error, RuntimeError) and callback.result is None
    assert "the model is left exactly as trained" in caplog.text
    trained = saved_weights(os.path.join(args.output_dir, "checkpoint-6"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    results = read_results(args.output_dir)
    assert "device lost" in results["error"] and results["report"] is None and "metrics" not in results
    assert results["source"]["global_step"] == 6 and not os.path.exists(os.path.join(args.output_dir, REPORT_DIR))
    assert not any("repair/accuracy_after" in e for e in trainer.state.log_history)


def confusion(model, dataset, num_classes=3):
    """Rows: true class, columns: predicted class, of `model` on every row of an image dataset."""
    rows = dataset[:]
    model.eval()
    with torch.no_grad():
        predicted = model(pixel_values=rows["pixel_values"]).logits.argmax(-1)
    counts = torch.bincount(rows["labels"] * num_classes + predicted, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).tolist()


def test_report_with_test_data_lands_in_output_dir(tmp_path):
    train, verified, test = image_data(96, seed=1), image_data(60, seed=2, noise=0.0), image_data(45, seed=3, noise=0.0)
    model = tiny_vit()
    args = training_args(tmp_path, max_steps=40, learning_rate=5e-3)  # long enough that the repair moves predictions
    stale = os.path.join(args.output_dir, REPORT_DIR, "stale.txt")  # the report of an earlier run there
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").close()
    trainer = Trainer(model=model, args=args, train_dataset=train)
    callback = RepairCallback(RepairConfig(alphas=[1.0], **FORCE), verified, test_dataset=test).attach(trainer)
    trained = {}
    trainer.callback_handler.callbacks.insert(0, _SnapshotAtTrainEnd(trained))
    trainer.train()

    assert callback.error is None and callback.result.adopted
    assert not os.path.exists(stale)  # replaced, like repair_results.json
    numbers = read_report(args.output_dir)
    # after = the repaired model; before = the weights as trained (swapped back in for one pass)
    scored = numbers["test"]
    as_trained = tiny_vit()
    as_trained.load_state_dict(trained)
    assert scored["num_samples"] == 45 and scored["confusion_before"] != scored["confusion_after"]
    assert scored["confusion_after"] == confusion(model, test)
    assert scored["confusion_before"] == confusion(as_trained, test)
    assert scored["accuracy_after"] == pytest.approx(np.trace(scored["confusion_after"]) / 45)
    assert [row["support"] for row in scored["per_class"]] == [15, 15, 15]
    assert any(not torch.equal(model.state_dict()[k], trained[k]) for k in trained)  # the report left it repaired


@pytest.mark.parametrize("how", ["fails", "disabled"])
def test_report_failure_or_opt_out_never_breaks_training(tmp_path, monkeypatch, caplog, how):
    if how == "fails":
        def broken(self, *args, **kwargs):
            raise RuntimeError("plotting exploded")

        monkeypatch.setattr(RepairResult, "report", broken)
    model = tiny_vit()
    args = training_args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=image_data(48, seed=1))
    callback = RepairCallback(RepairConfig(alphas=ALPHAS, **FORCE), image_data(30, seed=2, noise=0.0),
                              write_report=how == "fails").attach(trainer)
    trained = {}
    trainer.callback_handler.callbacks.insert(0, _SnapshotAtTrainEnd(trained))
    with caplog.at_level(logging.ERROR, logger="hf_repair"):
        output = trainer.train()

    assert output.global_step == 6 and callback.error is None and callback.result.adopted
    assert any(not torch.equal(model.state_dict()[k], trained[k]) for k in trained)  # still repaired
    results = read_results(args.output_dir)
    assert results["report"] is None and results["metrics"] == callback.result.metrics
    assert not os.path.exists(os.path.join(args.output_dir, REPORT_DIR))
    if how == "fails":
        assert "plotting exploded" in results["report_error"] and "could not write the repair report" in caplog.text
    else:
        assert "report_error" not in results and not caplog.text


@pytest.mark.parametrize(
    "config, verified, message",
    [
        (RepairConfig(target_modules=["no_such_layer"]), image_data(30, seed=2), "matched no repairable layer"),
        (RepairConfig(), text_data(30, seed=2), "No column of the verified split is a model input"),
        (RepairConfig(), image_data(30, seed=2, num_classes=5), "outside the model's 3 classes"),
        (RepairConfig(label_column="label"), image_data(30, seed=2), "no 'label' column"),
    ],
    ids=["missing-target", "wrong-columns", "label-range", "label-column"],
)
def test_bad_configuration_fails_before_training(tmp_path, config, verified, message):
    model = tiny_vit()
    before = state(model)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=image_data(48, seed=1))
    RepairCallback(config, verified).attach(trainer)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unattached_callback(tmp_path):
    train, verified = image_data(48, seed=1), image_data(30, seed=2, noise=0.0)
    # report_to an integration: refuse to train, since TensorBoard would close before the metrics exist
    trainer = Trainer(model=tiny_vit(), args=training_args(tmp_path, report_to="tensorboard"), train_dataset=train,
                      callbacks=[RepairCallback(RepairConfig(alphas=ALPHAS), verified)])
    with pytest.raises(ValueError, match=r"attach\(trainer\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    # report_to none: the metrics go to log_history as Trainer.log records them
    callback = RepairCallback(RepairConfig(alphas=ALPHAS), verified)
    trainer = Trainer(model=tiny_vit(), args=training_args(tmp_path), train_dataset=train, callbacks=[callback])
    trainer.train()
    entry = trainer.state.log_history[-1]
    assert entry["repair/accuracy_after"] == pytest.approx(callback.result.metrics["accuracy_after"])
    assert entry["step"] == 6 and entry["epoch"] == trainer.state.epoch


def test_callback_needs_a_verified_dataset():
    with pytest.raises(ValueError, match="verified_dataset"):
        RepairCallback(RepairConfig(), None)
    with pytest.raises(ValueError, match="write_report=True"):
        RepairCallback(RepairConfig(), image_data(10, seed=0), test_dataset=image_data(10, seed=1), write_report=False)


def test_without_a_config_the_callback_chooses_among_its_trajectory():
    # method "auto" measured best where the callback sits: fine-tuned pretrained models (BENCHMARKS.md)
    verified = datasets.Dataset.from_dict({"x": [[0.0]], "labels": [0]})
    assert RepairCallback(None, verified).config.method == "auto"
    assert RepairConfig().method == "projection"  # the standalone Repairer keeps the one-shot projection


def test_test_data_without_labels_fails_before_training(tmp_path):
    trainer = Trainer(model=tiny_vit(), args=training_args(tmp_path), train_dataset=image_data(48, seed=1))
    test = image_data(20, seed=3).remove_columns("labels")
    RepairCallback(RepairConfig(), image_data(30, seed=2), test_dataset=test).attach(trainer)
    with pytest.raises(ValueError, match="test_dataset has no label column 'labels'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_repair_config_parses_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, RepairConfig))
    args, config = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--seed", "5", "--target_modules", "query", "value", "--alphas", "1", "100",
         "--repair_seed", "3", "--num_folds", "4", "--no_repair_greater_is_better", "--metric_for_selection", "f1"]
    )
    assert args.seed == 5 and config.repair_seed == 3
    assert config.target_modules == ["query", "value"] and config.alphas == [1.0, 100.0]
    assert config.num_folds == 4 and config.repair_greater_is_better is False and config.metric_for_selection == "f1"

    _, default = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert default == RepairConfig()
    _, keyword = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--target_modules", "all"])
    assert keyword.target_modules == "all"
    _, regex = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--target_modules", r".*\.(query|value)", "--exclude_modules", "classifier"]
    )
    assert regex.target_modules == r".*\.(query|value)" and regex.exclude_modules == ["classifier"]
    with pytest.raises(SystemExit):  # argparse rejects a method that does not exist
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--method", "magic"])
