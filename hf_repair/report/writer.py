"""A repair report people would rather look at than read: one static HTML page, its figures, its numbers.

`write_report` (also `RepairResult.report`) writes a directory that opens from disk with no server
and no network:

- `index.html`: headline cards (before -> after), the accuracy per class, the alpha selection curve,
  the clean-space spectra and weight changes per layer, confusion matrices and, when identification
  ran, the score distribution and a gallery of the most suspect training samples (`html`).
- `figures/*.png`: the same figures (matplotlib, the optional `plots` extra; `figures`).
- `report.json`: every number on the page (`numbers`, `identification`); `summary.txt`: the same,
  as plain text (`summary`).
- `flagged.csv`: every flagged training sample, most suspect first, for relabelling.
- `samples/*.png`: the gallery thumbnails, for image data.

The report runs in the calling process only; under `accelerate launch` call it on the main process.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from torch import nn

from ..data import CollateFn
from ..evaluation import ForwardFn, default_forward
from ..utils.files import atomic_directory, check_output_directory
from .class_names import class_name, resolve_class_names
from .figures import draw_figures
from .files import FLAGGED_CSV, REPORT_HTML, REPORT_JSON, SAMPLES_DIR, SUMMARY_TXT
from .html import render_html
from .identification import identification_numbers, read_identification, write_flagged_csv
from .numbers import check_same_model, numbers_on_test_data, repair_numbers
from .summary import before_after_table, contradictions, summary_text

if TYPE_CHECKING:
    from ..results import RepairResult

__all__ = ["FLAGGED_CSV", "REPORT_HTML", "REPORT_JSON", "SUMMARY_TXT", "before_after_table", "write_report"]

logger = logging.getLogger(__name__)

DEFAULT_TOP_N = 48


def write_report(
    result: RepairResult,
    directory: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    test_dataset: datasets.Dataset | None = None,
    identification: Any | None = None,
    train_dataset: datasets.Dataset | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    top_n: int = DEFAULT_TOP_N,
    forward_fn: ForwardFn | None = None,
    collate_fn: CollateFn | None = None,
    batch_size: int | None = None,
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
        check_same_model(result, model)
    flags = read_identification(identification, train_dataset) if identification is not None else None
    label_column = result.config.label_column
    names = resolve_class_names(class_names, (test_dataset, train_dataset), label_column, model)

    numbers = repair_numbers(result)
    missing: list[dict[str, str]] = []
    if test_dataset is not None:
        numbers["test"] = numbers_on_test_data(
            result, model, test_dataset, label_column, forward_fn or default_forward, collate_fn,
            batch_size or result.config.batch_size, missing,
        )
    else:
        numbers["test"] = None
        missing.append({"item": "test accuracy, per-class accuracy and confusion matrices",
                        "reason": "no test data was given (pass test_dataset= and model=)"})
    num_classes = _num_classes(names, numbers["test"], flags)
    numbers["class_names"] = [class_name(names, i) for i in range(num_classes)] if num_classes else None
    if numbers["test"] is not None:
        for row in numbers["test"]["per_class"]:
            row["name"] = class_name(names, row["class"])

    thumbnails: dict[int, bytes] = {}
    flagged_rows: list[dict[str, Any]] = []
    if flags is not None:
        numbers["identification"], thumbnails, flagged_rows = identification_numbers(
            flags, train_dataset, names, label_column, top_n, missing
        )
    else:
        numbers["identification"] = None
        missing.append(_identification_missing(numbers["metrics"]))
    numbers["warnings"] = contradictions(numbers)

    with atomic_directory(directory, overwrite=overwrite) as staging:
        figures = draw_figures(numbers, str(staging))
        missing.extend({"item": f"figure '{f.title}'", "reason": f.reason} for f in figures if f.reason)
        numbers["figures"] = {f.name: f.file for f in figures if f.file}
        if flags is not None:
            write_flagged_csv(staging / FLAGGED_CSV, flagged_rows, numbers["identification"]["has_corruption"],
                              list(flags["extra"]))
            if thumbnails:
                (staging / SAMPLES_DIR).mkdir()
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
        (staging / REPORT_HTML).write_text(render_html(numbers, figures, staging, thumbnails), encoding="utf-8")
    path = os.path.join(os.path.abspath(directory), REPORT_HTML)
    # DEBUG: a caller that writes into a staging directory (the CLI) reports the final path itself.
    logger.debug("Wrote the repair report to %s", path)
    return path


def _identification_missing(metrics: dict[str, Any]) -> dict[str, str]:
    """Why the suspect samples are not shown: a fine-tune identified them but its table was not passed, or none ran."""
    if metrics.get("num_flagged") is None:
        return {"item": "suspect training samples",
                "reason": "identification did not run (pass identification=Repairer(...).identify(...))"}
    return {"item": f"score distribution, gallery of suspect samples and {FLAGGED_CSV}",
            "reason": f"the fine-tune flagged {metrics['num_flagged']:,} of {metrics['num_train']:,} training samples, "
                      f"but its per-sample table was not passed (pass identification=Repairer(...).identify(...) "
                      f"and train_dataset=)"}


def _num_classes(names: list[str] | None, test: dict[str, Any] | None, flags: dict[str, Any] | None) -> int:
    """How many classes the report names: the model's (from test predictions), the names', or the labels seen."""
    if test is not None:
        return len(test["per_class"])
    if names is not None:
        return len(names)
    if flags is not None and len(flags["index"]):
        return int(max(flags["given"].max(), flags["suggested"].max())) + 1
    return 0


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
