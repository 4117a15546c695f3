"""The `hf-repair` command line: tiny checkpoints built from configs, verified splits on disk."""

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_repair import RepairConfig, RepairResult
from hf_repair.cli.arguments import CLIArguments, build_parser, parse_arguments
from hf_repair.cli.command import format_table, main
from hf_repair.cli.loading import prepare_labels
from hf_repair.config import ARGUMENT_GROUPS
from hf_repair.integrations.callback import REPORT_DIR
from hf_repair.integrations.callback import RESULTS_NAME as RESULTS
from hf_repair.report.writer import before_after_table

WORDS = [f"w{i}" for i in range(40)]
NUM_TEXTS = 40
NUM_IMAGES = 30
TEST_IMAGES = {"cat": 4, "dog": 8}  # unbalanced, so a wrong label mapping changes every test number
STRONG = ["--alphas", "1", "3", "--min_improvement", "-1", "--significance_test", "none"]  # adopt a strong projection whatever it scores


def word_tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=32)



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A BERT and a ViT checkpoint (with tokenizer / image processor) and verified splits on disk."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    bert = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, num_labels=2,
                      id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(bert).save_pretrained(root / "bert")
    word_tokenizer().save_pretrained(root / "bert")
    (root / "bert" / "README.md").write_text("---\ntags:\n- generated_from_trainer\n---\n\n# My sentiment model\n")
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(NUM_TEXTS)]
    labels = [i % 2 for i in range(NUM_TEXTS)]
    with open(root / "verified.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, ["neg", "pos"][y]] for t, y in zip(texts, labels, strict=True))
    split = datasets.Dataset.from_dict({"sentence": texts, "label": labels})
    datasets.DatasetDict({"train": split, "validation": split.select(range(24))}).save_to_disk(root / "verified_dict")

    vit = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=2,
                    id2label={0: "dog", 1: "cat"}, label2id={"dog": 0, "cat": 1})
    ViTForImageClassification(vit).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(root / "vit")
    for folder, counts in (("images", {"cat": NUM_IMAGES // 2, "dog": NUM_IMAGES // 2}), ("test_images", TEST_IMAGES)):
        for name, count in counts.items():
            (root / folder / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / name / f"{i}.png")
    return root


def digest(directory):
    return {p: hashlib.sha256((directory / p).read_bytes()).hexdigest() for p in sorted(os.listdir(directory))}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def fails(argv, capsys, *messages):
    """Run main(argv), expect exit status 2, and return stderr after checking it names every message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err
    return err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for dataclass in (RepairConfig, CLIArguments):
        for f in dataclasses.fields(dataclass):
            assert f"--{f.name}" in text, f.name
            assert f.metadata.get("help"), f"{dataclass.__name__}.{f.name} has no help"
    assert "MODEL_DIR" in text and "accelerate launch" in text


def test_help_leads_with_the_required_arguments_then_one_group_per_phase(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    usage = text.splitlines()[0]
    assert all(name in usage for name in ("MODEL_DIR", "--verified", "--output_dir")), usage
    repair_flags = [f"  --{f.name} " for f in dataclasses.fields(RepairConfig)]
    first_repair_flag = min(text.index(flag) for flag in repair_flags)
    assert text.index("  --output_dir ") < first_repair_flag and text.index("  --verified ") < first_repair_flag

    # each phase's flags sit under its own heading, in the order of ARGUMENT_GROUPS
    headings = [text.index(f"\n{group._argument_group_name}:\n") for group in ARGUMENT_GROUPS]
    assert headings == sorted(headings)
    for group, start, end in zip(ARGUMENT_GROUPS, headings, headings[1:] + [len(text)], strict=True):
        for f in dataclasses.fields(group):
            assert start < text.index(f"  --{f.name} ") < end, f.name

    # one entry per flag (its first line starts at column 2): none states its default twice, none a useless one
    entries = re.split(r"\n(?=  \S)", text)
    assert all(entry.lower().count("default") <= 1 for entry in entries), [
        entry for entry in entries if entry.lower().count("default") > 1]
    assert "(default: None)" not in text and "(default: False)" not in text


def test_repair_options_from_every_group_make_one_config():
    parser = build_parser()
    argv = ["model", "--output_dir", "out", "--verified", "v.csv", "--method", "erase", "--alphas", "1", "3",
            "--flag_rule", "budget", "--flag_fraction", "0.5", "--retention_patience", "2", "--repair_seed", "5"]
    cli_args, config = parse_arguments(parser, parser.parse_args(argv))
    assert cli_args.output_dir == "out" and cli_args.verified == "v.csv"
    assert config == RepairConfig(method="erase", alphas=[1.0, 3.0], flag_rule="budget", flag_fraction=0.5,
                                  retention_patience=2, seed=5)


def test_text_checkpoint_with_csv(workdir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="hf_repair")
    model_dir, out = workdir / "bert", tmp_path / "out"
    before = digest(model_dir)
    assert main([str(model_dir), "--verified", str(workdir / "verified.csv"), "--output_dir", str(out), *STRONG]) == 0

    assert digest(model_dir) == before  # the trained checkpoint is never touched
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "repair", RESULTS} <= set(os.listdir(out))
    card = ModelCard.load(out / "README.md")
    assert card.data.tags == ["generated_from_trainer", "hf-repair"]  # MODEL_DIR's card, tagged
    assert "# My sentiment model" in card.text and "Repaired with hf_repair" in card.text

    results = json.loads((out / RESULTS).read_text())
    metrics = results["metrics"]
    assert metrics["num_verified"] == NUM_TEXTS
    assert metrics["adopted"] and metrics["alpha"] in (1.0, 3.0)
    assert results["source"] == {"model_dir": str(model_dir.absolute()),
                                 "verified": str((workdir / "verified.csv").absolute())}

    # The report lands in OUT with the same numbers, and the terminal shows its before/after table.
    assert results["report"] == f"{REPORT_DIR}/index.html" and "report_error" not in results
    assert {"index.html", "report.json", "summary.txt"} <= set(os.listdir(out / REPORT_DIR))
    numbers = json.loads((out / REPORT_DIR / "report.json").read_text())
    assert numbers["metrics"] == metrics and numbers["test"] is None
    assert numbers["layers"] and len(numbers["layers"]) == metrics["num_layers"]
    assert "Held-out verified accuracy" in (out / REPORT_DIR / "index.html").read_text()
    assert f"Wrote the repaired model and its report to {out}" in caplog.text
    assert ".tmp-" not in caplog.text  # no log line names a staging path that is renamed away
    printed = capsys.readouterr().out
    assert before_after_table(numbers) in printed
    row = next(line for line in printed.splitlines() if line.startswith("held-out verified"))
    assert f"{100 * metrics['accuracy_before']:.2f}%" in row and f"{100 * metrics['accuracy_after']:.2f}%" in row
    assert f"alpha: {metrics['alpha']:g}; adopted: yes" in printed and str(out / REPORT_DIR / "index.html") in printed

    # The saved repair re-creates the written model from the original checkpoint, bit for bit.
    repaired = AutoModelForSequenceClassification.from_pretrained(out)
    original = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert not same_weights(repaired, original)
    applied = RepairResult.from_pretrained(out / "repair").apply_to(original)
    assert same_weights(repaired, original)
    applied.undo()
    assert same_weights(original, AutoModelForSequenceClassification.from_pretrained(model_dir))


def image_predictions(model_dir, images):
    """Predicted label ids of every image in the folder `images` (class folders), and the true ids."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = ViTImageProcessor.from_pretrained(model_dir)
    files = sorted(images.glob("*/*.png"))
    labels = [model.config.label2id[f.parent.name] for f in files]
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels).logits.argmax(-1).numpy(), np.array(labels)


def test_fine_tuning_method_reads_the_training_data(workdir, tmp_path, capsys):
    model_dir, out = workdir / "bert", tmp_path / "out"
    data = str(workdir / "verified.csv")  # stands in for the training set too
    argv = [model_dir, "--verified", data, "--output_dir", out, "--method", "erase", "--score", "loss",
            "--flag_rule", "budget", "--flag_fraction", "0.25", "--retention_learning_rate", "1e-2"]
    fails(argv, capsys, "--method erase fine-tunes on the training data", "--train PATH")
    assert not out.exists()

    assert main([str(a) for a in argv + ["--train", data]]) == 0
    results = json.loads((out / RESULTS).read_text())
    metrics = results["metrics"]
    assert metrics["num_train"] == NUM_TEXTS and metrics["num_flagged"] == NUM_TEXTS // 4 and metrics["steps"] > 0
    assert results["source"]["train"] == str((workdir / "verified.csv").absolute())
    assert "repair" not in os.listdir(out)  # a fine-tune is not a re-appliable projection: the model is the repair
    assert f"{NUM_TEXTS // 4} of {NUM_TEXTS} training samples were flagged" in ModelCard.load(out / "README.md").text
    printed = capsys.readouterr().out
    assert f"erase, {NUM_TEXTS // 4} of {NUM_TEXTS} training samples flagged" in printed
    repaired = AutoModelForSequenceClassification.from_pretrained(out)
    assert same_weights(repaired, AutoModelForSequenceClassification.from_pretrained(model_dir)) != metrics["adopted"]


@pytest.mark.parametrize("method", ["erase", "auto"])
def test_the_printed_summary_gives_the_estimated_share_of_flags_that_are_wrong_labels(method, tmp_path):
    """A fine-tune's identification, or auto's refit of fresh, prints its estimate; marked where the noise rate warned."""
    estimate = {"estimated_flag_precision": 0.66, "estimated_flag_precision_interval": [0.6, 0.73],
                "estimated_flag_recall": 0.65, "noise_rate_warning": "the interval is wide"}
    metrics = {"num_verified": 300, "repair_time_s": 1.0, "accuracy_before": 0.6, "accuracy_after": 0.7,
               "heldout_accuracy": {}, "alpha": None}
    if method == "erase":
        metrics |= {"num_flagged": 400, "num_train": 1000, "steps": 30} | {f"identification_{k}": v for k, v in estimate.items()}
    else:
        metrics |= {"chosen": "fresh+erase", "fresh_identification": {"num_flagged": 400, "num_samples": 1000, **estimate}}
    printed = format_table(RepairResult(RepairConfig(method=method), metrics), {"metrics": metrics}, "Bert", tmp_path)
    assert "66.00% of the flags are wrong labels (interval 60.00% to 73.00%), 65.00% of the wrong labels are flagged" in printed
    assert "unreliable, as the noise rate" in printed and "400 of 1000 training samples" in printed
    del metrics["identification_estimated_flag_precision" if method == "erase" else "fresh_identification"]
    assert "wrong labels" not in format_table(RepairResult(RepairConfig(method=method), metrics), {"metrics": metrics},
                                              "Bert", tmp_path)


def test_image_folder_checkpoint_with_test_data(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [workdir / "vit", "--verified", workdir / "images", "--test", workdir / "test_images", "--output_dir", out]
    assert main([*map(str, argv), *STRONG]) == 0
    expected = {"model.safetensors", "preprocessor_config.json", "README.md", "repair", RESULTS, REPORT_DIR}
    assert expected <= set(os.listdir(out))
    results = json.loads((out / RESULTS).read_text())
    assert results["metrics"]["num_verified"] == NUM_IMAGES
    assert results["source"]["test"] == str((workdir / "test_images").absolute())
    repaired = AutoModelForImageClassification.from_pretrained(out)
    assert not same_weights(repaired, AutoModelForImageClassification.from_pretrained(workdir / "vit"))

    # The report scored --test before (the original checkpoint) and after (the written model), with
    # the folder names mapped to the model's label ids (dog=0, cat=1) and shown by name.
    numbers = json.loads((out / REPORT_DIR / "report.json").read_text())
    test = numbers["test"]
    after, labels = image_predictions(out, workdir / "test_images")
    before, _ = image_predictions(workdir / "vit", workdir / "test_images")
    assert test["num_samples"] == sum(TEST_IMAGES.values())
    assert [(row["name"], row["support"]) for row in test["per_class"]] == [("dog", 8), ("cat", 4)]
    assert test["confusion_after"] == [[int(((labels == t) & (after == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    assert test["confusion_before"] == [[int(((labels == t) & (before == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    assert test["accuracy_after"] == pytest.approx((after == labels).mean())
    printed = capsys.readouterr().out
    assert before_after_table(numbers) in printed
    row = next(line for line in printed.splitlines() if line.startswith("test "))
    assert f"{100 * test['accuracy_after']:.2f}%" in row and row.split()[-1] == "12"


def test_saved_dataset_dict_needs_a_split(workdir, tmp_path, capsys):
    common = [workdir / "bert", "--verified", workdir / "verified_dict", "--text_column", "sentence"]
    fails([*common, "--output_dir", tmp_path / "a"], capsys, "['train', 'validation']", "--split")
    assert not (tmp_path / "a").exists()
    assert main([str(a) for a in common] + ["--split", "validation", "--output_dir", str(tmp_path / "b"), *STRONG]) == 0
    assert json.loads((tmp_path / "b" / RESULTS).read_text())["metrics"]["num_verified"] == 24


def test_repair_dir_reapplies_a_saved_repair(workdir, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    main([str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), "--output_dir", str(first), *STRONG])
    capsys.readouterr()
    assert main([str(workdir / "bert"), "--repair_dir", str(first / "repair"), "--output_dir", str(second),
                 "--no_report"]) == 0
    assert same_weights(AutoModelForSequenceClassification.from_pretrained(first),
                        AutoModelForSequenceClassification.from_pretrained(second))
    assert "hf-repair" in ModelCard.load(second / "README.md").data.tags
    # --no_report: no report directory, but the same before/after table in the terminal
    assert REPORT_DIR not in os.listdir(second) and json.loads((second / RESULTS).read_text())["report"] is None
    metrics = json.loads((first / RESULTS).read_text())["metrics"]
    assert before_after_table({"metrics": metrics}) in capsys.readouterr().out


def test_a_failing_report_does_not_cost_the_repaired_model(workdir, tmp_path, capsys, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr("hf_repair.cli.command.write_report", broken)
    out = tmp_path / "out"
    assert main([str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), "--output_dir", str(out),
                 *STRONG]) == 0
    assert "model.safetensors" in os.listdir(out) and REPORT_DIR not in os.listdir(out)
    results = json.loads((out / RESULTS).read_text())
    assert results["report"] is None and "plotting exploded" in results["report_error"]
    assert "Could not write the repair report" in caplog.text
    assert "held-out verified" in capsys.readouterr().out


def test_labels_are_mapped_to_the_model_label_ids():
    model_config = ViTConfig(num_labels=2, id2label={0: "dog", 1: "cat"}, label2id={"dog": 0, "cat": 1})
    config = RepairConfig()
    by_folder = datasets.Dataset.from_dict(
        {"label": [0, 1, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog"])})
    )
    assert prepare_labels(by_folder, config, model_config)["labels"] == [1, 0, 0]
    by_name = datasets.Dataset.from_dict({"labels": ["dog", "cat"]})
    assert prepare_labels(by_name, config, model_config)["labels"] == [0, 1]
    with pytest.raises(ValueError, match="'bird'"):
        prepare_labels(datasets.Dataset.from_dict({"labels": ["bird", "cat"]}), config, model_config)


# ------------------------------------------------------------------------------------------------
# bad input: a clear error, exit status 2, and nothing written


def test_checkpoint_without_weights(workdir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(workdir / "bert" / "config.json", bare)
    fails([bare, "--verified", workdir / "verified.csv", "--output_dir", tmp_path / "out"], capsys,
          "no weights", "save_pretrained")
    fails([tmp_path / "missing", "--verified", workdir / "verified.csv", "--output_dir", tmp_path / "out"], capsys,
          "is not a directory")
    assert not (tmp_path / "out").exists()


def test_verified_columns_that_do_not_fit_the_model(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    fails([workdir / "bert", "--verified", workdir / "images", "--output_dir", out], capsys,
          "no column 'text'", "--text_column")
    fails([workdir / "vit", "--verified", workdir / "verified_dict", "--split", "train", "--output_dir", out], capsys,
          "no image column 'image'", "--image_column")
    bad_labels = tmp_path / "bad_labels.csv"
    bad_labels.write_text("text,label\n" + "".join(f"w1 w2,{'maybe' if i % 2 else 'pos'}\n" for i in range(10)))
    fails([workdir / "bert", "--verified", bad_labels, "--output_dir", out], capsys, "'maybe'", "label2id")
    fails([workdir / "bert", "--verified", workdir / "verified.csv", "--output_dir", out, "--label_column", "y"],
          capsys, "no label column 'y'")
    assert not out.exists()


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_rows_without_text_are_named_before_anything_is_written(workdir, tmp_path, capsys, suffix):
    texts = [" ".join(WORDS[i : i + 3]) for i in range(12)]
    texts[3], texts[7], texts[9] = "", None, "   "  # an empty cell, a missing one, only spaces
    if suffix == "jsonl":
        texts[10] = 42  # mixed JSON values: a number among the texts
    data, out = tmp_path / f"verified.{suffix}", tmp_path / "out"
    if suffix == "csv":
        with open(data, "w", newline="") as f:
            csv.writer(f).writerows([["text", "label"]] + [[t or "", ["neg", "pos"][i % 2]] for i, t in enumerate(texts)])
    else:
        data.write_text("".join(json.dumps({"text": t, "label": ["neg", "pos"][i % 2]}) + "\n"
                                for i, t in enumerate(texts)))
    rows = "3, 7, 9" + (", 10" if suffix == "jsonl" else "")
    err = fails([workdir / "bert", "--verified", data, "--output_dir", out], capsys,
                "Verified column 'text'", f"0-based rows {rows}", f"{len(rows.split(','))} of 12 rows", "Fill in")
    assert "Traceback" not in err and not out.exists()
    # the training data of a fine-tune is checked the same way, before any repair
    fails([workdir / "bert", "--verified", workdir / "verified.csv", "--train", data, "--method", "erase",
           "--output_dir", out], capsys, "Train column 'text'", f"0-based rows {rows}")
    assert not out.exists()


def test_unreadable_verified_paths(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    fails([workdir / "bert", "--verified", tmp_path / "missing.csv", "--output_dir", out], capsys, "does not exist")
    (tmp_path / "verified.xlsx").write_text("x")
    fails([workdir / "bert", "--verified", tmp_path / "verified.xlsx", "--output_dir", out], capsys, ".parquet")
    assert not out.exists()


def test_bad_test_data_fails_before_the_repair(workdir, tmp_path, capsys, monkeypatch):
    def no_repair(*args, **kwargs):
        raise AssertionError("the repair ran before the test data was checked")

    monkeypatch.setattr("hf_repair.repairer.Repairer.repair", no_repair)
    out = tmp_path / "out"
    common = [workdir / "bert", "--verified", workdir / "verified.csv", "--output_dir", out]
    fails([*common, "--test", tmp_path / "missing.csv"], capsys, "--test", "does not exist")
    fails([*common, "--test", workdir / "verified_dict", "--text_column", "sentence"], capsys,
          "['train', 'validation']", "--test_split")
    fails([*common, "--test", workdir / "images"], capsys, "test split has no column 'text'")
    fails([*common, "--test", workdir / "verified.csv", "--no_report"], capsys, "--no_report")
    assert not out.exists()


def test_interrupted_write_leaves_no_output(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelCard, "save", disk_full)  # the last file written into OUT
    fails([workdir / "bert", "--verified", workdir / "verified.csv", "--output_dir", out, *STRONG], capsys,
          "No space left on device")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_saved_repair_for_another_model(workdir, tmp_path, capsys):
    first = tmp_path / "first"
    main([str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), "--output_dir", str(first), *STRONG])
    out = tmp_path / "out"
    err = fails([workdir / "vit", "--repair_dir", first / "repair", "--output_dir", out], capsys,
                "made for another model", "no such layer")
    assert "bert.encoder.layer.0.attention.self.query" in err
    fails([workdir / "bert", "--output_dir", out], capsys, "--verified", "--repair_dir")
    assert not out.exists()


def test_output_dir_is_protected(workdir, tmp_path, capsys):
    model_dir = workdir / "bert"
    before = digest(model_dir)
    common = [model_dir, "--verified", workdir / "verified.csv"]
    fails([*common, "--output_dir", model_dir, "--overwrite"], capsys, "would overwrite the trained model")
    fails([*common, "--output_dir", workdir, "--overwrite"], capsys, "would overwrite the trained model")
    assert digest(model_dir) == before

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    fails([*common, "--output_dir", out], capsys, "not empty", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    assert main([str(a) for a in common] + ["--output_dir", str(out), "--overwrite"]) == 0
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


# ------------------------------------------------------------------------------------------------
# as a console script and under accelerate launch


def cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_console_script(workdir, tmp_path):
    script = shutil.which("hf-repair")
    if script is None:
        pytest.skip("the hf-repair console script is not installed; run `pip install -e .`")
    out = tmp_path / "out"
    args = [workdir / "bert", "--verified", workdir / "verified.csv", "--output_dir", out, *STRONG]
    done = subprocess.run([script, *map(str, args)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "held-out verified" in done.stdout and (out / REPORT_DIR / "index.html").is_file()
    assert json.loads((out / RESULTS).read_text())["metrics"]["num_verified"] == NUM_TEXTS

    again = subprocess.run([script, *map(str, args)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert again.returncode == 2 and "hf-repair: error:" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_accelerate_launch_two_processes(workdir, tmp_path, capsys):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed; run `pip install accelerate`")
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = [str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), *STRONG]
    assert main([*args, "--output_dir", str(single)]) == 0
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_repair.cli"]
    done = subprocess.run([*launch, *args, "--output_dir", str(multi)], capture_output=True, text=True,
                          env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("held-out verified") == 1  # only the main process reports
    assert os.path.isfile(multi / REPORT_DIR / "index.html")
    assert json.loads((multi / RESULTS).read_text())["metrics"]["num_verified"] == NUM_TEXTS
    a = AutoModelForSequenceClassification.from_pretrained(single).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(multi).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)



def test_auto_reads_a_trainer_output_dir_and_head_refit_writes_a_model(workdir, tmp_path, capsys):
    """`--method auto --checkpoints DIR` chooses among a run's checkpoints; neither it nor head refit saves clean spaces."""
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    for step, scale in ((10, 0.5), (20, 1.0)):  # two points of a "trajectory": the second is MODEL_DIR itself
        model = AutoModelForSequenceClassification.from_pretrained(workdir / "bert")
        with torch.no_grad():
            model.classifier.weight.mul_(scale)
        model.save_pretrained(run / f"checkpoint-{step}")
    # --train adds auto's erase refinement (the verified texts stand in for the training set), --initial_weights
    # its retrain refinement (the first checkpoint stands in for the weights training started from)
    auto_args = ["--checkpoints", str(run), "--train", str(workdir / "verified.csv"), "--score", "loss",
                 "--initial_weights", str(run / "checkpoint-10")]
    for method, extra in (("auto", auto_args), ("head_refit", [])):
        out = tmp_path / method
        assert main([str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), "--output_dir", str(out),
                     "--method", method, *extra]) == 0
        assert "model.safetensors" in os.listdir(out) and "repair" not in os.listdir(out)
        results = json.loads((out / RESULTS).read_text())
        assert results["config"]["method"] == method
        if method == "auto":
            assert results["source"]["checkpoints"] == str(run.absolute())
            assert results["metrics"]["chosen"]
            assert results["source"]["initial_weights"] == str((run / "checkpoint-10").absolute())
            assert {name.split("+")[-1] for name in results["metrics"]["heldout_accuracy"]} >= {"erase", "retrain"}
            assert results["metrics"]["fresh_objective"] == "contrastive"  # the default for a model of token ids
        assert f"hf-repair: BertForSequenceClassification, {NUM_TEXTS} verified samples, {method}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), "--output_dir",
              str(tmp_path / "refused"), "--checkpoints", str(run)])
    assert exit_info.value.code == 2 and not (tmp_path / "refused").exists()
    assert "--checkpoints is read by --method auto only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(workdir / "bert"), "--verified", str(workdir / "verified.csv"), "--output_dir",
              str(tmp_path / "refused"), "--method", "auto", "--initial_weights", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and not (tmp_path / "refused").exists()
    assert "--initial_weights" in capsys.readouterr().err
