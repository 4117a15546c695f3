"""A repair report people would rather look at than read: one static HTML page, its figures, its numbers.

`write_report` (also `RepairResult.report`) writes a directory that opens from disk with no server
and no network:

- `index.html`: headline cards (before -> after), the accuracy per class, the alpha selection curve,
  the clean-space spectra and weight changes per layer, confusion matrices and, when identification
  ran, the score distribution and a gallery of the most suspect training samples. Every figure is
  embedded as a data URI and the page carries its own CSS and no JavaScript, so the file alone can
  be mailed or attached to an issue.
- `figures/*.png`: the same figures (matplotlib, the optional `plots` extra).
- `report.json`: every number on the page; `summary.txt`: the same, as plain text.
- `flagged.csv`: every flagged training sample, most suspect first, for relabelling.
- `samples/*.png`: the gallery thumbnails, for image data.

Test predictions before the repair are computed by swapping the original weights (held by the
result's snapshot) in for one pass and writing the repaired ones back, so the model ends exactly as
it started. The report runs in the calling process only; under `accelerate launch` call it on the
main process.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..data import BOOKKEEPING_COLUMNS, CollateFn, model_columns, model_input_names, pop_labels
from ..evaluation import ForwardFn, default_forward
from ..utils.files import atomic_directory, check_output_directory
from .figures import ReportFigure, draw_figures, encode_png, image_to_uint8

if TYPE_CHECKING:
    from ..results import RepairResult

logger = logging.getLogger(__name__)

REPORT_HTML = "index.html"
REPORT_JSON = "report.json"
SUMMARY_TXT = "summary.txt"
FLAGGED_CSV = "flagged.csv"
DEFAULT_TOP_N = 48
_TEXT_SHOWN = 600  # characters of a text sample shown on the page (report.json keeps more)
_TEXT_KEPT = 2000
_IDENTIFICATION_COLUMNS = ("index", "score", "given_label", "suggested_label", "flagged")


def write_report(
    result: "RepairResult",
    directory: Union[str, os.PathLike],
    *,
    model: Optional[nn.Module] = None,
    test_dataset: Optional[datasets.Dataset] = None,
    identification: Optional[Any] = None,
    train_dataset: Optional[datasets.Dataset] = None,
    class_names: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    top_n: int = DEFAULT_TOP_N,
    forward_fn: Optional[ForwardFn] = None,
    collate_fn: Optional[CollateFn] = None,
    batch_size: Optional[int] = None,
) -> str:
    """Write the report of `result` into `directory` (atomically) and return the path of `index.html`.

    Args:
        result: what `Repairer.repair` returned.
        directory: created; an existing non-empty one is refused unless `overwrite=True`.
        model: the repaired model; needed for `test_dataset`, and its `config.id2label` names classes.
        test_dataset: labelled held-out data scored before and after the repair (per class, confusion).
        identification: what `Repairer.identify` returned (anything with `.table` and `.summary`).
        train_dataset: the dataset identification scored; its rows fill the gallery.
        class_names: names of the class ids; else a `ClassLabel` feature, `id2label`, or the ids.
        top_n: how many of the most suspect samples the gallery shows (`flagged.csv` lists all flagged).
        forward_fn / collate_fn: as given to `Repairer`, for models or data that need them.
        batch_size: for test predictions; `result.config.batch_size` by default.

    Example:
        >>> path = result.report("repair_report", model=model, test_dataset=test)
    """
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}.")
    check_output_directory(directory, overwrite)  # refuse before any prediction runs
    if test_dataset is not None and model is None:
        raise ValueError("test_dataset needs the repaired model to score it: pass model= as well.")
    if model is not None:
        _check_same_model(result, model)
    flags = _read_identification(identification, train_dataset) if identification is not None else None
    label_column = result.config.label_column
    names = _class_names(class_names, (test_dataset, train_dataset), label_column, model)

    numbers = _repair_numbers(result)
    missing: list[dict[str, str]] = []
    if test_dataset is not None:
        numbers["test"] = _test_numbers(
            result, model, test_dataset, label_column, forward_fn or default_forward, collate_fn,
            batch_size or result.config.batch_size, missing,
        )
    else:
        numbers["test"] = None
        missing.append({"item": "test accuracy, per-class accuracy and confusion matrices",
                        "reason": "no test data was given (pass test_dataset= and model=)"})
    num_classes = _num_classes(names, numbers["test"], flags)
    numbers["class_names"] = [_name(names, i) for i in range(num_classes)] if num_classes else None
    if numbers["test"] is not None:
        for row in numbers["test"]["per_class"]:
            row["name"] = _name(names, row["class"])

    thumbnails: dict[int, bytes] = {}
    flagged_rows: list[dict[str, Any]] = []
    if flags is not None:
        numbers["identification"], thumbnails, flagged_rows = _identification_numbers(
            flags, train_dataset, names, label_column, top_n, missing
        )
    else:
        numbers["identification"] = None
        missing.append({"item": "suspect training samples",
                        "reason": "identification did not run (pass identification=Repairer(...).identify(...))"})

    with atomic_directory(directory, overwrite=overwrite) as staging:
        figures = draw_figures(numbers, str(staging))
        missing.extend({"item": f"figure '{f.title}'", "reason": f.reason} for f in figures if f.reason)
        numbers["figures"] = {f.name: f.file for f in figures if f.file}
        if flags is not None:
            _write_flagged_csv(staging / FLAGGED_CSV, flagged_rows, numbers["identification"]["has_corruption"],
                               list(flags["extra"]))
            if thumbnails:
                (staging / "samples").mkdir()
                for sample in numbers["identification"]["gallery"]:
                    if sample["index"] in thumbnails:
                        (staging / sample["image"]).write_bytes(thumbnails[sample["index"]])
        numbers["missing"] = missing
        numbers["files"] = sorted(
            str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file()
        ) + [REPORT_HTML, REPORT_JSON, SUMMARY_TXT]
        numbers = _jsonable(numbers)
        (staging / REPORT_JSON).write_text(json.dumps(numbers, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (staging / SUMMARY_TXT).write_text(summary_text(numbers) + "\n", encoding="utf-8")
        (staging / REPORT_HTML).write_text(_render_html(numbers, figures, staging, thumbnails), encoding="utf-8")
    path = os.path.join(os.path.abspath(directory), REPORT_HTML)
    logger.info("Wrote the repair report to %s", path)
    return path


# --------------------------------------------------------------------------------------------
# numbers


def _repair_numbers(result: "RepairResult") -> dict[str, Any]:
    """Everything the result itself records: metrics, the selection curve, spaces and layers."""
    from ..utils.version import __version__

    metrics = dict(result.metrics)
    metric = result.config.metric_for_selection
    baseline = metrics.get("accuracy_before") if metric == "accuracy" else metrics.get(f"{metric}_before")
    spaces = {}
    for group, space in result.spaces.items():
        energies = space.energies.detach().double().cpu().numpy()
        total = energies.sum()
        share = energies / total if total > 0 else np.zeros_like(energies)
        cumulative = np.cumsum(share)
        spaces[group] = {
            "dim": space.dim,
            "rank": space.rank(),
            "num_rows": space.num_rows,
            "directions_for_90": int(np.searchsorted(cumulative, 0.9) + 1) if total > 0 else 0,
            "directions_for_99": int(np.searchsorted(cumulative, 0.99) + 1) if total > 0 else 0,
            "energy_share": [float(f"{s:.6g}") for s in share],
        }
    layers = [
        {"name": r.name, "kind": r.kind, "group": r.group, "input_dim": r.input_dim, "rank": r.rank,
         "relative_change": r.relative_change}
        for r in result.layers.values()
    ]
    return {
        "hf_repair_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": result.config.method,
        "adopted": result.adopted,
        "metrics": metrics,
        "config": result.config.to_dict(),
        "selection": {
            "metric": metric,
            "greater_is_better": result.config.repair_greater_is_better,
            "baseline": baseline,
            "chosen_alpha": metrics.get("alpha"),
            "points": [{"alpha": alpha, **scores} for alpha, scores in result.selection],
        },
        "spaces": spaces,
        "layers": layers,
    }


def _test_numbers(result: "RepairResult", model: nn.Module, dataset: datasets.Dataset, label_column: str,
                  forward_fn: ForwardFn, collate_fn: Optional[CollateFn], batch_size: int,
                  missing: list[dict[str, str]]) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrices on test data, before and after the repair."""
    if label_column not in dataset.column_names:
        raise ValueError(f"test_dataset has no {label_column!r} column (columns: {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError("test_dataset is empty; pass labelled held-out samples or leave it out.")
    snapshot = result.snapshot
    if result.adopted and snapshot is not None and snapshot.is_unchanged():
        raise ValueError(
            "The model holds its original weights although the repair was adopted (was result.undo() called?), "
            "so 'after' cannot be measured. Re-apply the repair before writing the report."
        )
    labels = np.asarray(_columns(dataset, [label_column])[label_column], dtype=np.int64)
    after = _predict(model, dataset, label_column, forward_fn, collate_fn, batch_size)
    if not result.adopted:
        before = after  # the weights were left bit-identical
    elif snapshot is not None:
        with snapshot.originals_swapped_in():
            before = _predict(model, dataset, label_column, forward_fn, collate_fn, batch_size)
    else:
        before = None
        missing.append({"item": "test accuracy before the repair",
                        "reason": "this result holds no snapshot of the original weights (it was loaded from disk)"})
    num_classes = after.shape[-1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"test_dataset labels span {labels.min()}..{labels.max()}, outside the model's {num_classes} classes.")
    predicted_after = after.argmax(-1)
    predicted_before = before.argmax(-1) if before is not None else None
    per_class = []
    for c in range(num_classes):
        members = labels == c
        support = int(members.sum())
        per_class.append({
            "class": c,
            "support": support,
            "accuracy_before": float((predicted_before[members] == c).mean()) if support and before is not None else None,
            "accuracy_after": float((predicted_after[members] == c).mean()) if support else None,
        })
    return {
        "num_samples": len(labels),
        "accuracy_before": float((predicted_before == labels).mean()) if before is not None else None,
        "accuracy_after": float((predicted_after == labels).mean()),
        "per_class": per_class,
        "confusion_before": _confusion(labels, predicted_before, num_classes) if before is not None else None,
        "confusion_after": _confusion(labels, predicted_after, num_classes),
    }


def _columns(dataset: datasets.Dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Whole columns as numpy arrays in one Arrow read (iterating a column row by row is slow)."""
    return dataset.select_columns(names).with_format("numpy")[:]


def _confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[list[int]]:
    counts = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


@torch.no_grad()
def _predict(model: nn.Module, dataset: datasets.Dataset, label_column: str, forward_fn: ForwardFn,
             collate_fn: Optional[CollateFn], batch_size: int) -> np.ndarray:
    """Logits of every row, in order, in this process (no collectives: the report is written by one process)."""
    input_names = model_input_names(model) if forward_fn is default_forward else None
    columns = model_columns(dataset, label_column, input_names)
    if columns == [label_column]:
        raise ValueError(
            f"No column of test_dataset is a model input (columns: {dataset.column_names}); tokenize or "
            f"preprocess it like the verified split."
        )
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_fn or default_data_collator)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = []
    try:
        for batch in loader:
            batch = dict(batch)
            pop_labels(batch, label_column, required=False)
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                      if input_names is None or k in input_names}
            logits.append(forward_fn(model, inputs).detach().float().cpu())
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"Could not batch test_dataset ({err}). Inputs of different lengths need a padding collator, "
            f"e.g. collate_fn=DataCollatorWithPadding(tokenizer)."
        ) from err
    finally:
        model.train(was_training)
    return torch.cat(logits).numpy()


def _check_same_model(result: "RepairResult", model: nn.Module) -> None:
    snapshot = result.snapshot
    if snapshot is None:
        return
    foreign = snapshot.missing_from(model)
    if foreign:
        raise ValueError(
            f"model is not the model this result repaired: it lacks {foreign[:3]}. Pass the model that was given "
            f"to Repairer."
        )


def _read_identification(identification: Any, train_dataset: Optional[datasets.Dataset]) -> dict[str, Any]:
    """The columns of `identification.table` as arrays, and its summary, after checking the contract."""
    table = getattr(identification, "table", None)
    summary = getattr(identification, "summary", None)
    if table is None or summary is None or not hasattr(table, "column_names"):
        raise TypeError(
            f"identification must have .table (a datasets.Dataset) and .summary (a dict), as returned by "
            f"Repairer.identify; got {type(identification).__name__}."
        )
    absent = [c for c in _IDENTIFICATION_COLUMNS if c not in table.column_names]
    if absent:
        raise ValueError(f"identification.table lacks the columns {absent} (it has {table.column_names}).")
    columns = _columns(table, table.column_names)
    index = np.asarray(columns["index"], dtype=np.int64)
    if train_dataset is not None and len(index) and (index.min() < 0 or index.max() >= len(train_dataset)):
        raise ValueError(
            f"identification.table indexes rows {index.min()}..{index.max()}, but train_dataset has "
            f"{len(train_dataset)} rows: pass the dataset that identification scored."
        )
    return {
        "index": index,
        "score": np.asarray(columns["score"], dtype=np.float64),
        "given": np.asarray(columns["given_label"], dtype=np.int64),
        "suggested": np.asarray(columns["suggested_label"], dtype=np.int64),
        "flagged": np.asarray(columns["flagged"], dtype=bool),
        "corrupted": np.asarray(columns["is_corrupted"], dtype=bool) if "is_corrupted" in table.column_names else None,
        # Further per-sample numbers (e.g. each score that was combined) go to the CSV as they are.
        "extra": {name: values for name, values in columns.items()
                  if name not in (*_IDENTIFICATION_COLUMNS, "is_corrupted") and np.ndim(values) == 1
                  and np.issubdtype(np.asarray(values).dtype, np.number)},
        "summary": dict(summary),
    }


def _identification_numbers(
    flags: dict[str, Any], train_dataset: Optional[datasets.Dataset], names: Optional[list[str]], label_column: str,
    top_n: int, missing: list[dict[str, str]],
) -> tuple[dict[str, Any], dict[int, bytes], list[dict[str, Any]]]:
    """Summary, score histogram and gallery of an identification; thumbnails; every flagged row for the CSV."""
    index, score, given, suggested = flags["index"], flags["score"], flags["given"], flags["suggested"]
    flagged, corrupted = flags["flagged"], flags["corrupted"]

    order = np.argsort(score, kind="stable")  # most harmful first; NaN scores last
    top = order[:top_n]
    gallery = [
        {"rank": rank + 1, "index": int(index[i]), "score": float(score[i]),
         "given_label": int(given[i]), "given_name": _name(names, given[i]),
         "suggested_label": int(suggested[i]), "suggested_name": _name(names, suggested[i]),
         "flagged": bool(flagged[i]), **({"is_corrupted": bool(corrupted[i])} if corrupted is not None else {})}
        for rank, i in enumerate(top)
    ]
    thumbnails: dict[int, bytes] = {}
    if train_dataset is not None and len(gallery):
        thumbnails = _fill_gallery(gallery, train_dataset, label_column)
    elif len(gallery):
        missing.append({"item": "contents of the suspect samples (images or text)",
                        "reason": "no train_dataset was given (pass the dataset that identification scored)"})

    flagged_rows = [
        {"index": int(index[i]), "score": float(score[i]), "given_label": int(given[i]),
         "given_name": _name(names, given[i]), "suggested_label": int(suggested[i]),
         "suggested_name": _name(names, suggested[i]),
         **({"is_corrupted": bool(corrupted[i])} if corrupted is not None else {}),
         **{name: values[i] for name, values in flags["extra"].items()}}
        for i in order[flagged[order]]
    ]
    numbers = {
        "summary": flags["summary"],
        "num_samples": len(index),
        "num_flagged": int(flagged.sum()),
        "has_corruption": corrupted is not None,
        "score_histogram": _histogram(score, corrupted),
        "gallery": gallery,
        "flagged_csv": FLAGGED_CSV,
    }
    return numbers, thumbnails, flagged_rows


def _histogram(score: np.ndarray, corrupted: Optional[np.ndarray]) -> dict[str, Any]:
    finite = np.isfinite(score)
    values = score[finite]
    if values.size == 0:
        return {"edges": [0.0, 1.0], "counts": [0], "num_not_finite": int((~finite).sum())}
    bins = int(np.clip(np.sqrt(values.size), 10, 60))
    edges = np.histogram_bin_edges(values, bins=bins)
    histogram: dict[str, Any] = {"edges": edges.tolist(), "counts": np.histogram(values, edges)[0].tolist(),
                                 "num_not_finite": int((~finite).sum())}
    if corrupted is not None:
        is_bad = corrupted[finite]
        histogram["counts_clean"] = np.histogram(values[~is_bad], edges)[0].tolist()
        histogram["counts_corrupted"] = np.histogram(values[is_bad], edges)[0].tolist()
    return histogram


def _fill_gallery(gallery: list[dict[str, Any]], dataset: datasets.Dataset, label_column: str) -> dict[int, bytes]:
    """Add each sample's content (text, or a thumbnail path, or a feature summary); return the PNGs."""
    kind, column = _modality(dataset, label_column)
    rows = dataset.select([g["index"] for g in gallery]).with_format(None)
    thumbnails: dict[int, bytes] = {}
    for sample, row in zip(gallery, rows):
        if kind == "image":
            try:
                thumbnails[sample["index"]] = encode_png(image_to_uint8(row[column]))
            except ValueError as err:
                logger.info("Sample %d is shown as numbers: %s", sample["index"], err)
            else:
                sample["kind"], sample["image"] = "image", f"samples/{sample['index']}.png"
                continue
        if kind == "text":
            sample["kind"], sample["text"] = "text", str(row[column])[:_TEXT_KEPT]
            continue
        sample["kind"] = "features"
        sample["features"] = {
            name: _describe(value) for name, value in row.items() if name != label_column and name not in BOOKKEEPING_COLUMNS
        }
    return thumbnails


def _modality(dataset: datasets.Dataset, label_column: str) -> tuple[str, Optional[str]]:
    """("image", column), ("text", column) or ("features", None), read from the dataset's features."""
    features = dataset.features
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return "image", name
    if "pixel_values" in features:
        return "image", "pixel_values"
    strings = [n for n, f in features.items() if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
    if strings:
        return "text", "text" if "text" in strings else strings[0]
    return "features", None


def _describe(value: Any) -> str:
    """A one-line summary of a non-image, non-text input: the value, or shape and statistics."""
    if isinstance(value, str):
        return value[:200]
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return repr(value)[:200]
    if array.size == 1:
        return f"{array.reshape(-1)[0]:.6g}"
    if array.size == 0:
        return f"empty, shape {array.shape}"
    head = ", ".join(f"{v:.3g}" for v in array.reshape(-1)[:6])
    return (f"shape {tuple(array.shape)}: mean {np.nanmean(array):.3g}, std {np.nanstd(array):.3g}, "
            f"min {np.nanmin(array):.3g}, max {np.nanmax(array):.3g}; first [{head}{', …' if array.size > 6 else ''}]")


def _write_flagged_csv(path: Path, rows: list[dict[str, Any]], has_corruption: bool, extra: list[str]) -> None:
    fields = ["index", "score", "given_label", "given_name", "suggested_label", "suggested_name"]
    if has_corruption:
        fields.append("is_corrupted")
    fields += extra
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------
# class names


def _class_names(given: Optional[Sequence[str]], datasets_: Sequence[Optional[datasets.Dataset]], label_column: str,
                 model: Optional[nn.Module]) -> Optional[list[str]]:
    """class_names, else a ClassLabel feature of the data, else the model's id2label (unless default), else None."""
    if given is not None:
        return [str(n) for n in given]
    for dataset in datasets_:
        feature = dataset.features.get(label_column) if dataset is not None else None
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label:
        names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]
        if names != [f"LABEL_{i}" for i in range(len(names))]:
            return names
    return None


def _num_classes(names: Optional[list[str]], test: Optional[dict[str, Any]], flags: Optional[dict[str, Any]]) -> int:
    if test is not None:
        return len(test["per_class"])
    if names is not None:
        return len(names)
    if flags is not None and len(flags["index"]):
        return int(max(flags["given"].max(), flags["suggested"].max())) + 1
    return 0


def _name(names: Optional[list[str]], label: Any) -> str:
    label = int(label)
    if label < 0:
        return "-"
    return names[label] if names is not None and label < len(names) else str(label)


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------------------------
# plain text


def before_after_table(numbers: dict[str, Any]) -> str:
    """A short before/after accuracy table for a terminal."""
    rows = [("held-out verified", numbers["metrics"]["accuracy_before"], numbers["metrics"]["accuracy_after"],
             numbers["metrics"].get("num_verified"))]
    if numbers.get("test"):
        test = numbers["test"]
        rows.append(("test", test["accuracy_before"], test["accuracy_after"], test["num_samples"]))
    lines = [f"{'accuracy':<20}{'before':>9}{'after':>9}{'change':>12}{'samples':>9}"]
    for label, before, after, count in rows:
        lines.append(f"{label:<20}{_pct(before):>9}{_pct(after):>9}{_delta(before, after):>12}{count or '':>9}")
    return "\n".join(lines)


def summary_text(numbers: dict[str, Any]) -> str:
    """Every headline of the report as plain text (what `summary.txt` holds)."""
    metrics, selection = numbers["metrics"], numbers["selection"]
    status = "adopted" if numbers["adopted"] else "not adopted: nothing beat the unrepaired model, weights unchanged"
    lines = [f"hf_repair {numbers['method']} report ({status})", "", before_after_table(numbers), ""]
    if selection["points"]:  # a projection ran
        chosen = selection["chosen_alpha"]
        lines.append(f"alpha: {chosen:g}" if chosen is not None else "alpha: none adopted")
        lines.append(f"alphas tried: {len(selection['points'])}, scored by held-out {selection['metric']} on "
                     f"{numbers['config']['num_folds']} folds of {metrics.get('num_verified')} verified samples")
    if metrics.get("num_flagged") is not None:  # a fine-tune ran
        lines.append(_finetune_line(metrics))
    layers = numbers["layers"]
    if layers:
        largest = max(layers, key=lambda layer: layer["relative_change"])
        lines.append(f"layers repaired: {len(layers)} in {len(numbers['spaces'])} clean spaces; largest change "
                     f"{100 * largest['relative_change']:.2f}% ({largest['name']})")
    test = numbers.get("test")
    if test:
        lines += ["", "test accuracy per class:", f"  {'class':<24}{'support':>8}{'before':>9}{'after':>9}{'change':>12}"]
        for row in test["per_class"]:
            lines.append(f"  {row['name'][:23]:<24}{row['support']:>8}{_pct(row['accuracy_before']):>9}"
                         f"{_pct(row['accuracy_after']):>9}{_delta(row['accuracy_before'], row['accuracy_after']):>12}")
    ident = numbers.get("identification")
    if ident:
        summary = ident["summary"]
        lines += ["", f"identification: {ident['num_flagged']} of {ident['num_samples']} training samples flagged "
                      f"(rule: {summary.get('flag_rule', '?')}, threshold: {_fmt(summary.get('threshold'))})"]
        quality = [f"{k} {_fmt(summary[k])}" for k in ("precision", "recall", "auroc") if summary.get(k) is not None]
        if quality:
            lines.append("  against the known corruption: " + ", ".join(quality))
        lines.append(f"  {FLAGGED_CSV} lists every flagged sample, most suspect first.")
    if numbers.get("missing"):
        lines += ["", "not shown:"] + [f"  - {m['item']}: {m['reason']}" for m in numbers["missing"]]
    return "\n".join(lines)


def _finetune_line(metrics: dict[str, Any]) -> str:
    return (f"fine-tune: {metrics['steps']} steps ({metrics['epochs']:.2f} training epochs), "
            f"{metrics['num_flagged']} of {metrics['num_train']} training samples flagged, {metrics.get('stop_reason')}")


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _delta(before: Optional[float], after: Optional[float]) -> str:
    return "n/a" if before is None or after is None else f"{100 * (after - before):+.2f} pts"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --bg:#f5f6f8; --card:#fff; --text:#1f2328; --muted:#61666d; --border:#dfe3e8; --accent:#2563eb;
  --good:#15803d; --bad:#b91c1c; --chip:#eef2f7; }
@media (prefers-color-scheme: dark) { :root { --bg:#0f1115; --card:#171a21; --text:#e6e8eb; --muted:#9aa3ad;
  --border:#2a2f39; --accent:#6ea8ff; --good:#4ade80; --bad:#f87171; --chip:#222733; } }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--text); line-height:1.5;
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
header { background:var(--card); border-bottom:1px solid var(--border); }
.wrap { max-width:1120px; margin:0 auto; padding:0 24px; }
header .wrap { padding-top:22px; padding-bottom:14px; }
h1 { font-size:1.55rem; margin:0 0 4px; letter-spacing:-.01em; }
h2 { font-size:1.2rem; margin:0 0 12px; }
h3 { font-size:1rem; margin:18px 0 8px; }
.sub { color:var(--muted); margin:0; }
nav { margin-top:12px; display:flex; flex-wrap:wrap; gap:6px; }
nav a { color:var(--text); text-decoration:none; background:var(--chip); padding:3px 10px; border-radius:999px; font-size:.85rem; }
nav a:hover { background:var(--border); }
.badge { display:inline-block; font-size:.75rem; font-weight:600; padding:2px 9px; border-radius:999px; vertical-align:middle; }
.badge.good { background:#dcfce7; color:#166534; } .badge.neutral { background:var(--chip); color:var(--muted); }
.badge.bad { background:#fee2e2; color:#991b1b; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(230px,1fr)); gap:14px; margin:22px 0 6px; }
.card { background:var(--card); border:1px solid var(--border); border-radius:14px; padding:14px 18px; }
.card .label { font-size:.74rem; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.card .value { font-size:1.4rem; white-space:nowrap; font-weight:650; font-variant-numeric:tabular-nums; margin:2px 0; }
.card .value .arrow { color:var(--muted); font-weight:400; margin:0 4px; }
.card .note { font-size:.82rem; color:var(--muted); }
.up { color:var(--good); font-weight:600; } .down { color:var(--bad); font-weight:600; } .flat { color:var(--muted); }
section { background:var(--card); border:1px solid var(--border); border-radius:14px; padding:20px 24px; margin:20px 0; }
section p { margin:6px 0 12px; }
.muted { color:var(--muted); }
figure { margin:12px 0; } figure img { max-width:100%; height:auto; border-radius:8px; background:#fff; }
figcaption { font-size:.85rem; color:var(--muted); margin-top:4px; }
.missing { border:1px dashed var(--border); border-radius:10px; padding:10px 14px; color:var(--muted); font-size:.9rem; margin:10px 0; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit,minmax(420px,1fr)); gap:16px; align-items:start; }
.table-wrap { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; font-size:.9rem; }
th, td { padding:6px 10px; border-bottom:1px solid var(--border); text-align:right; white-space:nowrap; }
th { font-weight:600; color:var(--muted); font-size:.78rem; text-transform:uppercase; letter-spacing:.04em; }
th:first-child, td:first-child { text-align:left; }
td.name { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:.82rem; white-space:normal; word-break:break-all; }
tr.chosen td { background:rgba(37,99,235,.09); font-weight:600; }
details summary { cursor:pointer; color:var(--accent); margin:8px 0; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill,minmax(170px,1fr)); gap:12px; }
.gallery.text { grid-template-columns:repeat(auto-fill,minmax(300px,1fr)); }
.sample { border:1px solid var(--border); border-radius:12px; padding:10px 12px; font-size:.84rem; }
.sample img { width:112px; height:112px; object-fit:contain; image-rendering:pixelated; display:block; margin:2px auto 8px; border-radius:6px; }
.sample blockquote { margin:4px 0 8px; padding:6px 10px; background:var(--chip); border-radius:8px; white-space:pre-wrap; word-break:break-word; }
.sample dl { display:grid; grid-template-columns:auto 1fr; gap:1px 8px; margin:0; }
.sample dt { color:var(--muted); } .sample dd { margin:0; font-weight:600; word-break:break-word; }
.sample .head { color:var(--muted); margin-bottom:2px; }
.sample .badges { display:flex; flex-wrap:wrap; gap:4px; min-height:1.4em; margin-bottom:4px; }
.sample dd.was { color:var(--bad); } .sample dd.fix { color:var(--good); }
.sample .feats { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:.75rem; margin:4px 0 8px; word-break:break-all; }
pre { background:var(--chip); padding:12px; border-radius:10px; overflow-x:auto; font-size:.8rem; }
footer { color:var(--muted); font-size:.8rem; padding:8px 0 36px; }
a { color:var(--accent); }
"""


def _render_html(numbers: dict[str, Any], figures: list[ReportFigure], directory: Path,
                 thumbnails: dict[int, bytes]) -> str:
    by_name = {f.name: f for f in figures}

    def figure(name: str) -> str:
        item = by_name.get(name)
        if item is None:  # no data for it; the section says so
            return ""
        if item.file is None:
            return f'<div class="missing">Figure not drawn: {_e(item.title)} &mdash; {_e(item.reason)}.</div>'
        data = base64.b64encode((directory / item.file).read_bytes()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(item.title)}">'
                f'<figcaption>{_e(item.title)} &middot; <a href="{_e(item.file)}">{_e(item.file)}</a></figcaption></figure>')

    projected = bool(numbers["selection"]["points"])  # erase / retention run no projection: no alpha, no clean spaces
    sections = [
        ("accuracy", "Accuracy", _accuracy_section(numbers, figure)),
        *([("selection", "Choosing alpha", _selection_section(numbers, figure)),
           ("layers", "Layers", _layers_section(numbers, figure))] if projected else []),
        ("confusion", "Confusion", _confusion_section(numbers, figure)),
        ("samples", "Suspect samples", _samples_section(numbers, figure, thumbnails)),
        ("files", "Files", _files_section(numbers)),
    ]
    nav = "".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{_e(title)}</h2>{content}</section>' for anchor, title, content in sections)
    adopted = numbers["adopted"]
    badge = ('<span class="badge good">adopted</span>' if adopted
             else '<span class="badge neutral">not adopted &middot; model unchanged</span>')
    verdict = ("The repair beat the unrepaired model on held-out verified samples and was applied."
               if adopted else "No alpha beat the unrepaired model on held-out verified samples, so every weight "
               "was left exactly as it was.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>hf_repair report: {_e(numbers['method'])}</title>
<style>{_CSS}</style></head>
<body><header><div class="wrap">
<h1>Repair report {badge}</h1>
<p class="sub">{_e(numbers['method'])} &middot; {_e(verdict)}</p>
<nav>{nav}</nav></div></header>
<main class="wrap">
{_cards(numbers)}
{_missing_box(numbers)}
{body}
<footer>hf_repair {_e(numbers['hf_repair_version'])} &middot; written {_e(numbers['created'])} &middot;
every number on this page is in <a href="{REPORT_JSON}">{REPORT_JSON}</a></footer>
</main></body></html>
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _delta_html(before: Optional[float], after: Optional[float]) -> str:
    if before is None or after is None:
        return '<span class="flat">n/a</span>'
    change = 100 * (after - before)
    css = "up" if change > 1e-9 else "down" if change < -1e-9 else "flat"
    return f'<span class="{css}">{change:+.2f} pts</span>'


def _card(label: str, value: str, note: str = "") -> str:
    return f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{value}</div><div class="note">{note}</div></div>'


def _before_after(before: Optional[float], after: Optional[float]) -> str:
    return f'{_pct(before)}<span class="arrow">&rarr;</span>{_pct(after)}'


def _cards(numbers: dict[str, Any]) -> str:
    metrics = numbers["metrics"]
    cards = [_card("Held-out verified accuracy", _before_after(metrics["accuracy_before"], metrics["accuracy_after"]),
                   f"{_delta_html(metrics['accuracy_before'], metrics['accuracy_after'])} &middot; "
                   f"{_e(metrics.get('num_verified', '?'))} verified samples")]
    test = numbers.get("test")
    if test:
        cards.append(_card("Test accuracy", _before_after(test["accuracy_before"], test["accuracy_after"]),
                           f"{_delta_html(test['accuracy_before'], test['accuracy_after'])} &middot; "
                           f"{test['num_samples']:,} test samples"))
    took = f" &middot; repair took {metrics['repair_time_s']:.1f}s" if metrics.get("repair_time_s") else ""
    if numbers["selection"]["points"]:  # a projection ran
        chosen = numbers["selection"]["chosen_alpha"]
        cards.append(_card("Chosen alpha", _e(f"{chosen:g}") if chosen is not None else "none",
                           f"of {len(numbers['selection']['points'])} tried" + took))
    if metrics.get("num_flagged") is not None:  # a fine-tune ran
        cards.append(_card("Fine-tune", f"{metrics['steps']:,} steps",
                           f"{metrics['num_flagged']:,} of {metrics['num_train']:,} training samples flagged &middot; "
                           f"{_e(metrics.get('stop_reason'))}" + took))
    layers = numbers["layers"]
    if layers:
        largest = max(layer["relative_change"] for layer in layers)
        cards.append(_card("Layers repaired", f"{len(layers)}",
                           f"{len(numbers['spaces'])} clean spaces &middot; largest change {100 * largest:.1f}%"))
    ident = numbers.get("identification")
    if ident:
        share = ident["num_flagged"] / max(ident["num_samples"], 1)
        cards.append(_card("Flagged training samples", f"{ident['num_flagged']:,}",
                           f"of {ident['num_samples']:,} ({100 * share:.1f}%)"))
        summary = ident["summary"]
        quality = [(k, summary.get(k)) for k in ("precision", "recall", "auroc") if summary.get(k) is not None]
        if quality:
            cards.append(_card("Flags vs known corruption", " / ".join(f"{v:.2f}" for _, v in quality),
                               " / ".join(k if k != "auroc" else "AUROC" for k, _ in quality)))
    return f'<div class="cards">{"".join(cards)}</div>'


def _missing_box(numbers: dict[str, Any]) -> str:
    if not numbers["missing"]:
        return ""
    items = "".join(f"<li><b>{_e(m['item'])}</b>: {_e(m['reason'])}</li>" for m in numbers["missing"])
    return f'<div class="missing"><b>Not shown in this report</b><ul>{items}</ul></div>'


def _accuracy_section(numbers: dict[str, Any], figure: Any) -> str:
    metrics = numbers["metrics"]
    rows = [("held-out verified", metrics["accuracy_before"], metrics["accuracy_after"], metrics.get("num_verified"))]
    test = numbers.get("test")
    if test:
        rows.append(("test", test["accuracy_before"], test["accuracy_after"], test["num_samples"]))
    table = _table(["data", "samples", "before", "after", "change"],
                   [[_e(r[0]), _e(r[3] if r[3] is not None else "?"), _pct(r[1]), _pct(r[2]), _delta_html(r[1], r[2])]
                    for r in rows])
    if metrics.get("num_flagged") is None:
        held_out = ("every verified sample is scored by a repair built without it "
                    f"({numbers['config']['num_folds']}-fold)")
    else:
        held_out = (f"the {_e(metrics.get('num_heldout', '?'))} verified samples held out from the fine-tune, which "
                    "judged its checkpoints")
    intro = (f"<p>Held-out verified accuracy: {held_out}. Per-class numbers and confusion matrices are measured on "
             "the test data.</p>")
    parts = [intro, f'<div class="grid2"><div class="table-wrap">{table}</div>{figure("accuracy")}</div>']
    if test:
        per_class = _table(
            ["class", "support", "before", "after", "change"],
            [[_e(r["name"]), str(r["support"]), _pct(r["accuracy_before"]), _pct(r["accuracy_after"]),
              _delta_html(r["accuracy_before"], r["accuracy_after"])] for r in test["per_class"]],
        )
        parts += ["<h3>Test accuracy per class</h3>", figure("per_class"), _collapsible(per_class, len(test["per_class"]), "classes")]
    else:
        parts.append(figure("per_class"))
    return "".join(parts)


def _selection_section(numbers: dict[str, Any], figure: Any) -> str:
    selection = numbers["selection"]
    metric = selection["metric"]
    points = selection["points"]
    keys = [metric] + sorted({k for p in points for k in p if k not in ("alpha", metric)})
    rows = []
    for p in points:
        chosen = selection["chosen_alpha"] is not None and p["alpha"] == selection["chosen_alpha"]
        cells = [f"{p['alpha']:g}" + (" &#9733;" if chosen else "")] + [_fmt(p.get(k)) for k in keys]
        rows.append((cells, "chosen" if chosen else ""))
    baseline = selection["baseline"]
    intro = (f"<p>Each alpha was scored by held-out {_e(metric)} on the verified folds; the unrepaired model scores "
             f"{_fmt(baseline)}. The best alpha is adopted only if it beats that.</p>")
    table = _table(["alpha"] + [_e(k) for k in keys], rows)
    return intro + f'<div class="grid2">{figure("selection")}<div class="table-wrap">{table}</div></div>'


def _layers_section(numbers: dict[str, Any], figure: Any) -> str:
    spaces, layers = numbers["spaces"], numbers["layers"]
    intro = ("<p>Left: how the verified inputs of each clean space spread their energy over directions (a steep drop "
             "means few directions carry the clean signal). Right: how far each weight moved, "
             "&#8214;W<sub>after</sub> &minus; W<sub>before</sub>&#8214; / &#8214;W<sub>before</sub>&#8214;.</p>")
    rows = [[_e(layer["name"]), _e(layer["kind"]), _e(layer["group"]), str(layer["input_dim"]), str(layer["rank"]),
             str(spaces.get(layer["group"], {}).get("directions_for_90", "?")), f"{100 * layer['relative_change']:.2f}%"]
            for layer in layers]
    table = _table(["layer", "kind", "clean space", "input dim", "rank", "dirs for 90%", "change"], rows, name_columns=(0, 2))
    return (intro + f'<div class="grid2">{figure("spectra")}{figure("weight_change")}</div>'
            + _collapsible(table, len(rows), "layers"))


def _confusion_section(numbers: dict[str, Any], figure: Any) -> str:
    if not numbers.get("test"):
        return '<div class="missing">No test data was given: pass test_dataset= and model= to see confusion matrices.</div>'
    return "<p>Rows are true classes, columns predictions; each row is normalised to its class size.</p>" + figure("confusion")


def _samples_section(numbers: dict[str, Any], figure: Any, thumbnails: dict[int, bytes]) -> str:
    ident = numbers.get("identification")
    if not ident:
        return ('<div class="missing">Identification did not run: pass identification=Repairer(...).identify(...) '
                "and train_dataset= to see the score distribution and the most suspect training samples.</div>")
    summary_rows = [[_e(k), _e(v)] for k, v in _flatten(ident["summary"])]
    parts = [
        f"<p>Every training sample was scored; lower scores are more harmful. {ident['num_flagged']:,} samples were "
        f'flagged: <a href="{FLAGGED_CSV}">{FLAGGED_CSV}</a> lists all of them, most suspect first, for relabelling.</p>',
        f'<div class="grid2">{figure("scores")}<div class="table-wrap">{_table(["summary", "value"], summary_rows, name_columns=(1,))}</div></div>',
    ]
    gallery = ident["gallery"]
    if gallery:
        text = any(g.get("kind") == "text" for g in gallery)
        cards = "".join(_sample_card(g, thumbnails) for g in gallery)
        parts.append(f"<h3>The {len(gallery)} most suspect samples</h3>"
                     f'<div class="gallery{" text" if text else ""}">{cards}</div>')
    return "".join(parts)


def _sample_card(sample: dict[str, Any], thumbnails: dict[int, bytes]) -> str:
    content = ""
    if sample.get("kind") == "image" and sample["index"] in thumbnails:
        data = base64.b64encode(thumbnails[sample["index"]]).decode("ascii")
        content = f'<img src="data:image/png;base64,{data}" alt="training sample {sample["index"]}">'
    elif sample.get("kind") == "text":
        text = sample["text"]
        content = f"<blockquote>{_e(text[:_TEXT_SHOWN])}{'…' if len(text) > _TEXT_SHOWN else ''}</blockquote>"
    elif sample.get("kind") == "features":
        content = '<div class="feats">' + "<br>".join(
            f"<b>{_e(k)}</b>: {_e(v)}" for k, v in sample["features"].items()) + "</div>"
    badges = ['<span class="badge bad">flagged</span>' if sample["flagged"] else ""]
    if "is_corrupted" in sample:
        badges.append('<span class="badge bad">corrupted</span>' if sample["is_corrupted"]
                      else '<span class="badge good">clean</span>')
    changed = sample["given_label"] != sample["suggested_label"]
    return (f'<div class="sample"><div class="head">#{sample["rank"]} &middot; row {sample["index"]}</div>'
            f'<div class="badges">{"".join(b for b in badges if b)}</div>{content}<dl>'
            f'<dt>given</dt><dd{" class=was" if changed else ""}>{_e(sample["given_name"])}</dd>'
            f'<dt>suggested</dt><dd{" class=fix" if changed else ""}>{_e(sample["suggested_name"])}</dd>'
            f'<dt>score</dt><dd>{_e(_fmt(sample["score"]))}</dd></dl></div>')


def _flatten(summary: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(key, text) rows of a summary; nested dicts become `outer.inner` rows, lists comma-joined."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            rows.append((f"{prefix}{key}", ", ".join(_fmt(v) for v in value) or "none"))
        else:
            rows.append((f"{prefix}{key}", _fmt(value)))
    return rows


def _files_section(numbers: dict[str, Any]) -> str:
    links = "".join(f'<li><a href="{_e(f)}">{_e(f)}</a></li>' for f in numbers["files"] if not f.startswith("samples/"))
    samples = sum(f.startswith("samples/") for f in numbers["files"])
    extra = f"<li>samples/: {samples} thumbnails</li>" if samples else ""
    config = _e(json.dumps(numbers["config"], indent=2))
    return (f"<p>Everything on this page, as files next to it:</p><ul>{links}{extra}</ul>"
            f"<details><summary>Repair configuration</summary><pre>{config}</pre></details>")


def _table(headers: list[str], rows: list[Any], name_columns: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for row in rows:
        cells, css = row if isinstance(row, tuple) else (row, "")
        tds = "".join(f'<td class="name">{c}</td>' if i in name_columns else f"<td>{c}</td>" for i, c in enumerate(cells))
        body.append(f'<tr class="{css}">{tds}</tr>' if css else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _collapsible(content: str, count: int, what: str, limit: int = 25) -> str:
    wrapped = f'<div class="table-wrap">{content}</div>'
    return wrapped if count <= limit else f"<details><summary>Show all {count} {what}</summary>{wrapped}</details>"
