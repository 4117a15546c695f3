"""The suspect training samples of a report: an identification result read, its score histogram,
the gallery of the most suspect samples (with their images, text or features) and `flagged.csv`.

The identification is duck-typed (anything with `.table`, a `datasets.Dataset` in dataset order,
and `.summary`, a dict): the report sits below `hf_repair.identification` and never imports it.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..data import BOOKKEEPING_COLUMNS
from .class_names import class_name
from .figures import encode_png, image_to_uint8
from .files import FLAGGED_CSV, SAMPLES_DIR

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("index", "score", "given_label", "suggested_label", "flagged")
TEXT_KEPT = 2000  # characters of a text sample kept in report.json (the page shows fewer)


def read_identification(identification: Any, train_dataset: datasets.Dataset | None) -> dict[str, Any]:
    """The columns of `identification.table` as arrays, and its summary, after checking the contract."""
    table = getattr(identification, "table", None)
    summary = getattr(identification, "summary", None)
    if table is None or summary is None or not hasattr(table, "column_names"):
        raise TypeError(
            f"identification must have .table (a datasets.Dataset) and .summary (a dict), as returned by "
            f"Repairer.identify; got {type(identification).__name__}."
        )
    absent = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if absent:
        raise ValueError(f"identification.table lacks the columns {absent} (it has {table.column_names}).")
    columns = table.with_format("numpy")[:]  # every column in one Arrow read
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
                  if name not in (*REQUIRED_COLUMNS, "is_corrupted") and np.ndim(values) == 1
                  and np.issubdtype(np.asarray(values).dtype, np.number)},
        "summary": dict(summary),
    }


def identification_numbers(
    flags: dict[str, Any], train_dataset: datasets.Dataset | None, names: list[str] | None, label_column: str,
    top_n: int, missing: list[dict[str, str]],
) -> tuple[dict[str, Any], dict[int, bytes], list[dict[str, Any]]]:
    """Summary, score histogram and gallery of an identification; thumbnails; every flagged row for the CSV."""
    index, score, given, suggested = flags["index"], flags["score"], flags["given"], flags["suggested"]
    flagged, corrupted = flags["flagged"], flags["corrupted"]

    order = np.argsort(score, kind="stable")  # most harmful first; NaN scores last
    gallery = [
        {"rank": rank + 1, "index": int(index[i]), "score": float(score[i]),
         "given_label": int(given[i]), "given_name": class_name(names, given[i]),
         "suggested_label": int(suggested[i]), "suggested_name": class_name(names, suggested[i]),
         "flagged": bool(flagged[i]), **({"is_corrupted": bool(corrupted[i])} if corrupted is not None else {})}
        for rank, i in enumerate(order[:top_n])
    ]
    thumbnails: dict[int, bytes] = {}
    if train_dataset is not None and gallery:
        thumbnails = _fill_gallery(gallery, train_dataset, label_column)
    elif gallery:
        missing.append({"item": "contents of the suspect samples (images or text)",
                        "reason": "no train_dataset was given (pass the dataset that identification scored)"})

    flagged_rows = [
        {"index": int(index[i]), "score": float(score[i]), "given_label": int(given[i]),
         "given_name": class_name(names, given[i]), "suggested_label": int(suggested[i]),
         "suggested_name": class_name(names, suggested[i]),
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


def _histogram(score: np.ndarray, corrupted: np.ndarray | None) -> dict[str, Any]:
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
    for sample, row in zip(gallery, rows, strict=True):
        if kind == "image":
            try:
                thumbnails[sample["index"]] = encode_png(image_to_uint8(row[column]))
            except ValueError as err:
                logger.info("Sample %d is shown as numbers: %s", sample["index"], err)
            else:
                sample["kind"], sample["image"] = "image", f"{SAMPLES_DIR}/{sample['index']}.png"
                continue
        if kind == "text":
            sample["kind"], sample["text"] = "text", str(row[column])[:TEXT_KEPT]
            continue
        sample["kind"] = "features"
        sample["features"] = {
            name: _describe(value) for name, value in row.items() if name != label_column and name not in BOOKKEEPING_COLUMNS
        }
    return thumbnails


def _modality(dataset: datasets.Dataset, label_column: str) -> tuple[str, str | None]:
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


def write_flagged_csv(path: Path, rows: list[dict[str, Any]], has_corruption: bool, extra: list[str]) -> None:
    """Every flagged training sample, most suspect first, with its given and suggested label, for relabelling."""
    fields = ["index", "score", "given_label", "given_name", "suggested_label", "suggested_name"]
    if has_corruption:
        fields.append("is_corrupted")
    fields += extra
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
