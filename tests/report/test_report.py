"""The repair report: page, figures, JSON, summary and CSV for image, text and feature-vector data."""

import copy
import csv
import html
import io
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_repair import RepairConfig, Repairer
from hf_repair.report import before_after_table
from hf_repair.report.figures import encode_png, image_to_uint8
from hf_repair.report.summary import estimated_precision_lines

FIGURES = ("accuracy", "per_class", "selection", "spectra", "weight_change", "confusion", "scores")
ALPHAS = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
FORCE = dict(min_improvement=-1.0, significance_test="none")  # adopt the best alpha even if it is no better, so weights really change


def repair_config(**overrides):
    return RepairConfig(**{"alphas": ALPHAS, "repair_seed": 0, "repair_disable_tqdm": True, "alpha_search": "grid", **overrides})



@dataclass
class FakeIdentification:
    """The `IdentificationResult` contract: `.table` (a Dataset in dataset order) and `.summary`."""

    table: datasets.Dataset
    summary: dict = field(default_factory=dict)


def fake_identification(given, suggested, is_corrupted=None, seed=0, flag_fraction=0.3):
    """Scores that are lower for corrupted samples (as a working identification's are), flags the lowest."""
    rng = np.random.default_rng(seed)
    n = len(given)
    corrupted = np.zeros(n, bool) if is_corrupted is None else np.asarray(is_corrupted, bool)
    score = rng.normal(size=n) - 2.0 * corrupted
    threshold = float(np.quantile(score, flag_fraction))
    flagged = score <= threshold
    columns = {"index": np.arange(n), "score": score, "given_label": np.asarray(given),
               "suggested_label": np.asarray(suggested), "flagged": flagged}
    if is_corrupted is not None:
        columns["is_corrupted"] = corrupted
    summary = {"num_samples": n, "num_flagged": int(flagged.sum()), "flag_rule": "fraction", "threshold": threshold}
    if is_corrupted is not None:
        summary["precision"] = float(corrupted[flagged].mean())
        summary["recall"] = float(flagged[corrupted].mean())
    return FakeIdentification(datasets.Dataset.from_dict(columns), summary)


def column(dataset, name):
    return dataset.select_columns([name]).with_format("numpy")[:][name]


def read_png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# image task: Fashion-MNIST, SmallCNN


@pytest.fixture(scope="module")
def image_task():
    offline_data = pytest.importorskip("testbed.offline_data")
    from testbed.experiments import SmallCNN, train_classifier
    from testbed.noise import corrupt_dataset

    try:
        full = offline_data.load_fashion_mnist("train")
        test = offline_data.load_fashion_mnist("test").select(range(200))
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not installed ({err}); apt-get install -y dataset-fashion-mnist")
    torch.manual_seed(0)
    train = corrupt_dataset(full.select(range(800)), noise="symmetric", rate=0.4, seed=0)
    verified = full.select(range(1000, 1150))
    model = train_classifier(SmallCNN(width=8), train, epochs=2, progress=False, seed=0)
    original = weights_of(model)
    config = repair_config(target_modules="all", **FORCE)
    result = Repairer(model, config).repair(verified)
    assert result.adopted
    ident = fake_identification(*(column(train, c) for c in ("labels", "clean_labels", "is_corrupted")))
    return dict(model=model, original=original, result=result, train=train, test=test, ident=ident)


@pytest.fixture(scope="module")
def image_report(image_task, tmp_path_factory):
    from testbed.experiments import evaluate_accuracy

    t = image_task
    repaired = weights_of(t["model"])
    accuracy_after = evaluate_accuracy(t["model"], t["test"])
    directory = tmp_path_factory.mktemp("reports") / "image"
    path = t["result"].report(directory, model=t["model"], test_dataset=t["test"], identification=t["ident"],
                              train_dataset=t["train"], top_n=12)
    return dict(path=Path(path), directory=directory, repaired=repaired, accuracy_after=accuracy_after,
                numbers=json.loads((directory / "report.json").read_text()))


def test_image_report_writes_every_file(image_report):
    directory = image_report["directory"]
    assert image_report["path"] == directory.absolute() / "index.html"
    for name in FIGURES:
        width, height = read_png_size((directory / "figures" / f"{name}.png").read_bytes())
        assert width > 200 and height > 200, name
    thumbnails = sorted((directory / "samples").iterdir())
    assert len(thumbnails) == 12
    assert all(read_png_size(p.read_bytes()) == (28, 28) for p in thumbnails)
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    numbers = image_report["numbers"]
    assert set(numbers["figures"]) == set(FIGURES)
    assert numbers["missing"] == []
    listed = set(numbers["files"])
    written = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
    assert listed == written


def test_image_report_numbers_match_the_repair_and_the_model(image_task, image_report):
    numbers, result = image_report["numbers"], image_task["result"]
    assert numbers["adopted"] is True
    assert numbers["metrics"]["accuracy_before"] == result.metrics["accuracy_before"]
    assert numbers["metrics"]["accuracy_after"] == result.metrics["accuracy_after"]
    assert [p["alpha"] for p in numbers["selection"]["points"]] == ALPHAS
    assert numbers["selection"]["chosen_alpha"] == result.metrics["alpha"]
    assert [p["accuracy"] for p in numbers["selection"]["points"]] == [s["accuracy"] for _, s in result.selection]
    assert [layer["name"] for layer in numbers["layers"]] == list(result.layers)
    for layer in numbers["layers"]:
        assert layer["relative_change"] == pytest.approx(result.layers[layer["name"]].relative_change)
    for group, space in numbers["spaces"].items():
        assert len(space["energy_share"]) == result.spaces[group].dim
        assert sum(space["energy_share"]) == pytest.approx(1.0, abs=1e-4)
        assert space["energy_share"] == sorted(space["energy_share"], reverse=True)
        assert 1 <= space["directions_for_90"] <= space["directions_for_99"] <= space["dim"]

    test = numbers["test"]
    labels = column(image_task["test"], "labels")
    assert test["num_samples"] == len(labels)
    assert test["accuracy_after"] == pytest.approx(image_report["accuracy_after"])
    assert [row["support"] for row in test["per_class"]] == np.bincount(labels, minlength=10).tolist()
    assert numbers["class_names"][0] == "T-shirt/top"  # from the ClassLabel feature
    assert [row["name"] for row in test["per_class"]] == numbers["class_names"]
    for key in ("before", "after"):
        confusion = np.asarray(test[f"confusion_{key}"])
        assert confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()
        assert np.trace(confusion) / len(labels) == pytest.approx(test[f"accuracy_{key}"])
        per_class = [row[f"accuracy_{key}"] for row in test["per_class"]]
        assert np.allclose(np.diag(confusion) / confusion.sum(axis=1), per_class)


def test_report_measures_before_with_the_original_weights_and_leaves_the_repaired_ones(image_task, image_report):
    from testbed.experiments import evaluate_accuracy

    model = image_task["model"]
    after_report = weights_of(model)
    assert all(torch.equal(after_report[k], v) for k, v in image_report["repaired"].items())
    changed = [k for k, v in image_task["original"].items() if not torch.equal(v, after_report[k])]
    assert changed  # the repair did change the model, so "before" needed the original weights
    model.load_state_dict(image_task["original"])
    try:
        before = evaluate_accuracy(model, image_task["test"])
    finally:
        model.load_state_dict(after_report)
    assert image_report["numbers"]["test"]["accuracy_before"] == pytest.approx(before)


def test_gallery_and_csv_hold_the_most_suspect_samples(image_task, image_report):
    ident, directory = image_task["ident"], image_report["directory"]
    score, flagged = column(ident.table, "score"), column(ident.table, "flagged")
    identification = image_report["numbers"]["identification"]
    gallery = identification["gallery"]
    assert [g["index"] for g in gallery] == np.argsort(score, kind="stable")[:12].tolist()
    names = image_task["train"].features["labels"].names
    for sample in gallery:
        i = sample["index"]
        assert sample["score"] == pytest.approx(score[i])
        assert sample["given_name"] == names[image_task["train"][i]["labels"]]
        assert sample["suggested_name"] == names[image_task["train"][i]["clean_labels"]]
        assert sample["kind"] == "image" and (directory / sample["image"]).is_file()
        assert "is_corrupted" in sample
    assert identification["num_flagged"] == flagged.sum()
    histogram = identification["score_histogram"]
    assert sum(histogram["counts_clean"]) + sum(histogram["counts_corrupted"]) == len(score)
    assert sum(histogram["counts_corrupted"]) == int(column(image_task["train"], "is_corrupted").sum())

    with open(directory / "flagged.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(r["index"]) for r in rows) == np.flatnonzero(flagged).tolist()
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)
    assert {"given_name", "suggested_name", "is_corrupted"} <= set(rows[0])


def test_page_shows_the_numbers_figures_and_samples(image_task, image_report):
    page = image_report["path"].read_text()
    numbers = image_report["numbers"]
    assert page.count('src="data:image/png;base64,') == len(FIGURES) + 12
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert f"{100 * numbers['test']['accuracy_after']:.2f}%" in page
    assert f"{100 * numbers['metrics']['accuracy_before']:.2f}%" in page
    assert "Ankle boot" in page and "T-shirt/top" in page
    assert 'href="flagged.csv"' in page
    summary = (image_report["directory"] / "summary.txt").read_text()
    assert "adopted" in summary and "test" in summary and "T-shirt/top" in summary
    assert f"{100 * numbers['test']['accuracy_after']:.2f}%" in summary
    assert ("stopped early" in summary) == bool(numbers["metrics"]["alphas_stopped_early"])


def test_existing_directory_is_refused_unless_overwrite(image_task, tmp_path):
    result, model = image_task["result"], image_task["model"]
    directory = tmp_path / "report"
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.report(directory)
    assert (directory / "keep.txt").read_text() == "mine"
    result.report(directory, overwrite=True, model=model)
    assert not (directory / "keep.txt").exists()
    assert (directory / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_without_matplotlib_json_and_summary_are_written_and_the_page_says_why(image_task, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    t = image_task
    path = t["result"].report(tmp_path / "report", identification=t["ident"], train_dataset=t["train"], top_n=4)
    directory = tmp_path / "report"
    assert not (directory / "figures").exists()
    numbers = json.loads((directory / "report.json").read_text())
    assert numbers["figures"] == {}
    missing = {m["item"]: m["reason"] for m in numbers["missing"]}
    assert "figure 'Distribution of identification scores'" in missing
    assert all("hf_repair[plots]" in reason for item, reason in missing.items() if item.startswith("figure"))
    page = Path(path).read_text()
    assert "matplotlib is not installed" in page and "hf_repair[plots]" in page
    assert page.count('src="data:image/png;base64,') == 4  # the gallery needs no matplotlib
    assert "matplotlib is not installed" in (directory / "summary.txt").read_text()


def test_bad_input_is_refused_before_anything_is_written(image_task, tmp_path):
    result, model, ident = image_task["result"], image_task["model"], image_task["ident"]
    target = tmp_path / "report"
    with pytest.raises(ValueError, match="pass model="):
        result.report(target, test_dataset=image_task["test"])
    with pytest.raises(ValueError, match="not the model this result repaired"):
        result.report(target, model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lacks the columns"):
        result.report(target, identification=FakeIdentification(ident.table.remove_columns("flagged")))
    with pytest.raises(ValueError, match="pass the dataset that identification scored"):
        result.report(target, identification=ident, train_dataset=image_task["train"].select(range(10)))
    with pytest.raises(TypeError, match=r"\.table"):
        result.report(target, identification=object())
    with pytest.raises(ValueError, match="top_n"):
        result.report(target, top_n=-1)
    assert not target.exists()

    repaired = weights_of(model)
    result.undo()
    try:
        with pytest.raises(ValueError, match="undo"):
            result.report(target, model=model, test_dataset=image_task["test"])
    finally:
        model.load_state_dict(repaired)
    assert not target.exists()


# ------------------------------------------------------------------------------------------------
# text task: a tiny BERT built from a config

TEXTS = [
    "a wonderful, moving film", "dull and far too long", "the best <b>cast</b> of the year", "I walked out",
    "sharp writing & great pacing", "a mess from start to finish", "charming and funny", "painfully slow",
    "an instant classic", "flat jokes, no heart", "beautifully shot", "a waste of a good premise",
] * 3


def tokenize(texts, vocab, length=12):
    ids, masks = [], []
    for text in texts:
        tokens = [vocab.setdefault(word, len(vocab) + 1) for word in text.lower().split()][:length]
        ids.append(tokens + [0] * (length - len(tokens)))
        masks.append([1] * len(tokens) + [0] * (length - len(tokens)))
    return ids, masks


@pytest.fixture(scope="module")
def text_task():
    torch.manual_seed(0)
    vocab: dict[str, int] = {}
    ids, masks = tokenize(TEXTS, vocab)
    labels = [i % 2 for i in range(len(TEXTS))]
    train = datasets.Dataset.from_dict({"text": TEXTS, "input_ids": ids, "attention_mask": masks, "labels": labels})
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config).eval()
    result = Repairer(model, repair_config(**FORCE)).repair(train)
    suggested = [1 - y if i % 5 == 0 else y for i, y in enumerate(labels)]
    ident = fake_identification(labels, suggested)
    return dict(model=model, result=result, train=train, ident=ident)


def test_text_report_shows_text_and_label_names(text_task, tmp_path):
    t = text_task
    path = t["result"].report(tmp_path / "report", model=t["model"], test_dataset=t["train"],
                              identification=t["ident"], train_dataset=t["train"], top_n=5)
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["class_names"] == ["negative", "positive"]  # from model.config.id2label
    gallery = numbers["identification"]["gallery"]
    assert len(gallery) == 5
    for sample in gallery:
        assert sample["kind"] == "text" and sample["text"] == TEXTS[sample["index"]]
        assert sample["given_name"] in ("negative", "positive")
    assert not (tmp_path / "report" / "samples").exists()
    assert "has_corruption" in numbers["identification"] and not numbers["identification"]["has_corruption"]
    assert "counts_corrupted" not in numbers["identification"]["score_histogram"]
    assert [row["support"] for row in numbers["test"]["per_class"]] == [18, 18]
    layers = numbers["layers"]
    assert any("attention" in layer["name"] for layer in layers)
    # query, key and value share one input, hence one clean space
    groups = {layer["name"].rsplit(".", 1)[-1]: layer["group"] for layer in layers if "attention.self" in layer["name"]}
    assert groups["query"] == groups["key"] == groups["value"]

    page = Path(path).read_text()
    for sample in gallery:
        shown = TEXTS[sample["index"]].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert shown in page
    assert "<b>cast</b>" not in page  # user text is escaped, never markup
    assert page.count("<blockquote>") == 5


# ------------------------------------------------------------------------------------------------
# feature vectors, unnamed classes, huge datasets


class VectorModel(nn.Module):
    def __init__(self, dim=8, num_classes=3):
        super().__init__()
        self.hidden = nn.Linear(dim, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, features, labels=None):
        return SequenceClassifierOutput(logits=self.head(torch.relu(self.hidden(features))))


def test_feature_vectors_unnamed_classes_and_a_huge_dataset(tmp_path):
    rng = np.random.default_rng(0)
    n = 20_000
    features = rng.normal(size=(n, 8)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64) + (features[:, 1] > 1).astype(np.int64)
    train = datasets.Dataset.from_dict({"features": features, "labels": labels}).with_format("torch")
    model = VectorModel()
    result = Repairer(model, repair_config()).repair(train.select(range(300)))
    suggested = (labels + 1) % 3
    ident = fake_identification(labels, suggested, flag_fraction=0.25)

    path = result.report(tmp_path / "report", model=model, test_dataset=train.select(range(500)),
                         identification=ident, train_dataset=train, top_n=7)
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["class_names"] == ["0", "1", "2"]
    gallery = numbers["identification"]["gallery"]
    assert len(gallery) == 7
    for sample in gallery:
        assert sample["kind"] == "features"
        summary = sample["features"]["features"]
        assert summary.startswith("shape (8,)")
        assert f"{features[sample['index']].mean():.3g}" in summary
        assert sample["given_name"] == str(labels[sample["index"]])
    with open(tmp_path / "report" / "flagged.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == int(column(ident.table, "flagged").sum()) == n // 4
    assert "is_corrupted" not in rows[0]
    page = Path(path).read_text()
    assert page.count('class="sample"') == 7
    assert "shape (8,)" in page


def test_report_of_a_repair_that_was_not_adopted_has_no_spectra_and_says_why(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 8)).astype(np.float32)
    data = datasets.Dataset.from_dict({"features": features, "labels": (features[:, 0] > 0).astype(np.int64)})
    model = VectorModel()
    result = Repairer(model, repair_config(min_improvement=1.0)).repair(data.with_format("torch"))
    assert not result.adopted

    path = result.report(tmp_path / "report", model=model)
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["spaces"] == {} and {layer["rank"] for layer in numbers["layers"]} == {None}
    assert not list((tmp_path / "report").rglob("*spectra*"))
    page = Path(path).read_text()
    assert "clean spaces of the whole verified split were not decomposed" in page
    assert "2 clean spaces" in page  # hidden and head read different inputs
    assert "in 2 clean spaces" in (tmp_path / "report" / "summary.txt").read_text()


def test_classes_named_by_argument_and_pil_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)) for _ in range(6)]
    pixel_values = np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 255 for im in images])
    verified = datasets.Dataset.from_dict({"pixel_values": pixel_values[:, :, :8, :8], "labels": [0, 1, 0, 1, 0, 1]})
    train = datasets.Dataset.from_dict({"image": images, "labels": [0, 1, 0, 1, 0, 1]},
                                       features=datasets.Features({"image": datasets.Image(), "labels": datasets.Value("int64")}))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 2)

        def forward(self, pixel_values, labels=None):
            return SequenceClassifierOutput(logits=self.fc(pixel_values.flatten(1)))

    result = Repairer(Tiny(), repair_config(alphas=[1.0, 1e4], num_folds=2)).repair(verified)
    ident = fake_identification([0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 0, 1])
    result.report(tmp_path / "report", identification=ident, train_dataset=train, class_names=["cat", "dog"], top_n=3)
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["class_names"] == ["cat", "dog"]
    for sample in numbers["identification"]["gallery"]:
        assert sample["given_name"] in ("cat", "dog")
        data = (tmp_path / "report" / sample["image"]).read_bytes()
        assert read_png_size(data) == (30, 20)


# ------------------------------------------------------------------------------------------------
# thumbnails


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes with Pillow, independently of how they were encoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_png_encoder_round_trips(shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(array)), array)


def test_normalized_channel_first_tensor_is_scaled_to_the_full_range():
    value = torch.linspace(-1.5, 2.5, 28 * 28).reshape(1, 28, 28)
    image = image_to_uint8(value)
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    large = image_to_uint8(np.zeros((3, 512, 300), np.float32))
    assert large.shape == (128, 75, 3)
    with pytest.raises(ValueError, match="as an image"):
        image_to_uint8(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2)))


# ------------------------------------------------------------------------------------------------
# the real identification, when it is there


def test_report_of_a_real_identification(image_task, tmp_path):
    pytest.importorskip("hf_repair.identification.identify", reason="hf_repair.identification.identify is not written yet")
    from testbed.offline_data import load_fashion_mnist

    t = image_task
    verified = load_fashion_mnist("train").select(range(1000, 1150))
    repairer = Repairer(t["model"], repair_config(target_modules="all"))
    ident = repairer.identify(t["train"], verified)
    path = t["result"].report(tmp_path / "report", identification=ident, train_dataset=t["train"], top_n=6)
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    table = ident.table
    with open(tmp_path / "report" / "flagged.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == ident.summary["num_flagged"]
    extra = [c for c in table.column_names if c not in ("index", "score", "given_label", "suggested_label", "flagged", "is_corrupted")]
    assert extra and set(extra) <= set(rows[0])  # each computed score is in the CSV
    page = Path(path).read_text()
    card = page.split('<section id="samples">', 1)[1].split('<div class="gallery', 1)[0]  # all but the gallery
    for key, value in ident.summary.items():
        assert f"<td>{key}</td>" not in card  # each row is labelled for a person, not by its key
        if isinstance(value, dict):  # nested summaries are written out, never as outer.inner rows
            assert not any(f"{key}.{inner}" in page for inner in value)
    assert numbers["identification"]["num_flagged"] == int(column(table, "flagged").sum())
    assert numbers["identification"]["num_samples"] == len(t["train"])
    lowest = np.argsort(column(table, "score").astype(float), kind="stable")[:6]
    assert [g["index"] for g in numbers["identification"]["gallery"]] == column(table, "index")[lowest].tolist()


@pytest.fixture(scope="module")
def finetune_task(image_task):
    """An erase repair of a freshly trained model: the fine-tune identifies its own flags and judges on one fold."""
    from testbed.experiments import SmallCNN, evaluate_accuracy, train_classifier

    t = image_task
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(width=8), t["train"], epochs=2, progress=False, seed=0)
    accuracy_before = evaluate_accuracy(model, t["test"])
    verified = t["test"]  # labelled and disjoint from the training set: stands in for a verified split here
    config = repair_config(method="erase", score="loss", flag_rule="budget", flag_fraction=0.3, retention_epochs=0.5,
                           **FORCE)
    result = Repairer(model, config).repair(verified, train_dataset=t["train"])
    return dict(model=model, result=result, accuracy_before=accuracy_before,
                accuracy_after=evaluate_accuracy(model, t["test"]), repaired=weights_of(model))


def test_report_of_a_fine_tune_shows_the_fine_tune_and_no_alpha(image_task, finetune_task, tmp_path):
    t, f = image_task, finetune_task
    model, result, repaired = f["model"], f["result"], f["repaired"]
    accuracy_before, accuracy_after = f["accuracy_before"], f["accuracy_after"]
    result.report(tmp_path / "report", model=model, test_dataset=t["test"])

    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    summary = (tmp_path / "report" / "summary.txt").read_text()
    page = (tmp_path / "report" / "index.html").read_text()
    # "before" is the trained model, swapped in for the measurement and out again bit for bit
    assert numbers["test"]["accuracy_before"] == pytest.approx(accuracy_before)
    assert numbers["test"]["accuracy_after"] == pytest.approx(accuracy_after)
    assert all(torch.equal(v, repaired[k]) for k, v in model.state_dict().items())
    metrics = result.metrics
    assert f"fine-tune: {metrics['steps']} steps" in summary and f"{metrics['num_flagged']} of 800" in summary
    assert "alpha" not in summary and "Choosing alpha" not in page and "Fine-tune" in page
    assert "held out from the fine-tune" in page


# ------------------------------------------------------------------------------------------------
# a report that does not contradict itself


def test_fine_tune_report_without_the_table_shows_its_flags_and_the_fold_that_judged_it(finetune_task, tmp_path):
    result = finetune_task["result"]
    metrics = result.metrics
    assert metrics["num_heldout"] < metrics["num_verified"]  # one held-out fold judged the fine-tune
    result.report(tmp_path / "report")  # no identification=: the fine-tune's own flags are only in its metrics
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    summary = (tmp_path / "report" / "summary.txt").read_text()
    page = (tmp_path / "report" / "index.html").read_text()

    for text in (page, summary):
        assert "did not run" not in text.lower()  # it ran, inside the fine-tune
        assert "per-sample table was not passed" in text or "per-sample identification table was not passed" in text
    assert f"flagged {metrics['num_flagged']:,} of {metrics['num_train']:,}" in page
    assert f"precision {metrics['identification_precision']:.2f}" in page  # its quality, from the metrics
    assert "Flags vs known corruption" in page

    heldout, verified = metrics["num_heldout"], metrics["num_verified"]
    assert f"{heldout} held-out verified samples" in page
    assert f"{verified} verified samples" not in page
    accuracy_table = page.split('<section id="accuracy">', 1)[1].split("</table>", 1)[0]
    assert f"<td>{heldout}</td>" in accuracy_table and f"<td>{verified}</td>" not in accuracy_table
    row = next(line for line in before_after_table(numbers).splitlines() if line.startswith("held-out verified"))
    assert row.split()[-1] == str(heldout)
    assert row in summary


def predictions(model, dataset):
    with torch.no_grad():
        return model(pixel_values=torch.as_tensor(column(dataset, "pixel_values"))).logits.argmax(-1).numpy()


def test_adopted_repair_whose_test_accuracy_fell_is_flagged_on_the_page_and_in_the_summary(image_task, tmp_path):
    t = image_task
    repaired = copy.deepcopy(t["model"]).eval()
    original = copy.deepcopy(t["model"]).eval()
    original.load_state_dict(t["original"])
    pool = t["train"].select_columns(["pixel_values"])
    before, after = predictions(original, pool), predictions(repaired, pool)
    changed = np.flatnonzero(before != after)
    assert len(changed) > 0  # the repair changed some predictions
    pool = pool.select(changed)
    # Test labels the original model gets right and the repaired one gets wrong: test accuracy falls 100% -> 0%.
    fell = pool.add_column("labels", before[changed].tolist())
    assert t["result"].adopted
    t["result"].report(tmp_path / "fell", model=t["model"], test_dataset=fell)
    numbers = json.loads((tmp_path / "fell" / "report.json").read_text())
    assert (numbers["test"]["accuracy_before"], numbers["test"]["accuracy_after"]) == (1.0, 0.0)
    assert len(numbers["warnings"]) == 1 and "test accuracy fell" in numbers["warnings"][0]
    page = (tmp_path / "fell" / "index.html").read_text()
    title = page.split("<h1>", 1)[1].split("</h1>", 1)[0]
    assert "adopted" in title and "test accuracy fell" in title  # next to the adopted badge
    assert page.index('class="warning"') < page.index('class="cards"')  # above everything else
    assert "100.00% to 0.00%" in page
    summary = (tmp_path / "fell" / "summary.txt").read_text()
    assert summary.splitlines()[2].startswith("WARNING: ") and "test accuracy fell from 100.00% to 0.00%" in summary

    # The same samples labelled as the repaired model predicts them: test accuracy rose, nothing to warn about.
    rose = pool.add_column("labels", after[changed].tolist())
    t["result"].report(tmp_path / "rose", model=t["model"], test_dataset=rose)
    numbers = json.loads((tmp_path / "rose" / "report.json").read_text())
    assert (numbers["test"]["accuracy_before"], numbers["test"]["accuracy_after"]) == (0.0, 1.0)
    assert numbers["warnings"] == []
    assert 'class="warning"' not in (tmp_path / "rose" / "index.html").read_text()
    assert "WARNING" not in (tmp_path / "rose" / "summary.txt").read_text()


IDENTIFY_SUMMARY = {  # the keys Repairer.identify writes, with the values of a typical run
    "num_samples": 800, "num_flagged": 240, "flag_rule": "noise_rate", "threshold": -2.31, "score": "probe",
    "estimated_noise_rate": 0.3, "noise_rate_source": "probe_disagreement",
    "noise_rate_estimates": {"negative_influence": 0.41, "probe_disagreement": 0.3}, "blind_classes": [9],
    "num_verified": 150, "influence_layers": ["fc1", "classifier"], "closed_form": ["classifier"],
    "preconditioner": {"fc1": "kfac", "classifier": "exact"}, "damping": 1e-3, "trained_verified_accuracy": 0.61,
    "verified_pass_s": 1.234, "train_pass_s": 65.2, "identify_time_s": 67.0, "samples_per_second": 11.9,
    "train_pass_samples_per_second": 12.3, "probe_layer": "fc1", "probe_l2": 0.01, "probe_heldout_accuracy": 0.7,
    "precision": 0.8, "recall": 0.75, "auroc": 0.91, "auroc_by_score": {"influence": 0.8, "loss": 0.85},
    "suggested_label_accuracy_on_corrupted": float("nan"), "refit_prox": None,
    "noise_transition": [[0.7 if i == j else 0.3 / 9 for j in range(10)] for i in range(10)],
    "estimated_flag_precision": 0.78, "estimated_flag_precision_interval": [0.71, 0.84], "estimated_flag_recall": 0.74,
    "flag_precision_source": "probe",
}


def test_identification_card_is_written_for_a_person(image_task, tmp_path):
    t = image_task
    ident = FakeIdentification(t["ident"].table, IDENTIFY_SUMMARY)
    path = t["result"].report(tmp_path / "report", identification=ident, train_dataset=t["train"], top_n=4)
    page = Path(path).read_text()
    card = page.split('<section id="samples">', 1)[1].split('<div class="gallery', 1)[0]  # all but the gallery
    text = re.sub(r"<[^>]+>", " | ", card.split("</figure>")[-1])  # the figure's caption names its file
    assert "preconditioner" not in text and "verified_pass_s" not in text
    assert not re.findall(r"[A-Za-z]+_\w+|[A-Za-z]+\.[A-Za-z]+", text), text  # nothing named by an internal key
    assert "n/a" not in text and "nan" not in text.lower() and "None" not in text  # unmeasured values are left out
    for label, value in [("Training samples scored", "800"), ("Flagged", "240 (30.00%)"), ("Score threshold", "-2.31"),
                         ("Estimated share of wrong labels", "30.00%, from the probe's disagreement"),
                         ("Estimated share of right labels, by true class", "T-shirt/top 70.00%, Trouser 70.00%, "),
                         ("Curvature approximation", "K-FAC for fc1; exact for classifier"),
                         ("Pass over the verified samples", "1.2 s"), ("Pass over the training set", "1 min 05 s"),
                         ("Training samples per second, overall", "11.9 samples/s"),
                         ("Flagged samples whose label was wrong (precision)", "80.00%"),
                         ("Classes with no verified sample (harm to them is not seen)", "Ankle boot"),
                         ("Layers the influence reads", "2: fc1, classifier"),
                         ("Estimated share of the flags that are wrong labels", "78.00% (interval 71.00% to 84.00%), "
                          "from the probe's predictions on held-out verified samples"),
                         ("Estimated share of the wrong labels flagged", "74.00%")]:
        assert re.search(rf"<td>{re.escape(html.escape(label))}</td><td>{re.escape(html.escape(value))}", card), label
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["identification"]["summary"]["verified_pass_s"] == 1.234  # report.json keeps the keys
    summary = (tmp_path / "report" / "summary.txt").read_text()
    assert ("estimated without the truth: 78.00% of the flags are wrong labels (interval 71.00% to 84.00%), "
            "74.00% of the wrong labels are flagged") in summary


def test_an_estimated_flag_precision_is_marked_unreliable_where_the_noise_rate_warns():
    values = {"identification_estimated_flag_precision": 0.3, "identification_estimated_flag_recall": 0.28,
              "identification_estimated_flag_precision_interval": [0.2, 0.4]}
    (line,) = estimated_precision_lines(values, "identification_")
    assert line.endswith("30.00% of the flags are wrong labels (interval 20.00% to 40.00%), 28.00% of the wrong labels "
                         "are flagged")
    values["identification_noise_rate_warning"] = "the probe is more confident on training samples"
    (line,) = estimated_precision_lines(values, "identification_")
    assert line.endswith("are flagged; unreliable, as the noise rate: see its warning")
    assert estimated_precision_lines({"num_flagged": 3}) == []  # nothing estimated, nothing said
