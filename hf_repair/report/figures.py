"""The pictures of a repair report: matplotlib figures drawn from the report's numbers, and PNG thumbnails.

Every figure is drawn from the JSON-ready numbers of the report alone, so what the page shows is
exactly what `report.json` holds. matplotlib is an optional extra (`pip install "hf_repair[plots]"`):
without it `draw_figures` draws nothing and says why, and the rest of the report is still written.
Figures use matplotlib's object API (`Figure` + the Agg canvas), never `pyplot`, so drawing a report
touches no global plotting state. Sample thumbnails are encoded with Pillow (a dependency), so the
gallery needs no matplotlib.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .files import FIGURES_DIR

logger = logging.getLogger(__name__)

PLOTS_INSTALL = 'pip install "hf_repair[plots]"'
BEFORE_COLOR = "#9ca3af"
AFTER_COLOR = "#2563eb"
CLEAN_COLOR = "#2563eb"
CORRUPTED_COLOR = "#dc2626"
THUMBNAIL_MAX_SIDE = 128
SPECTRUM_FLOOR = 1e-10  # the tolerance of `CleanSpace.rank`, relative to the strongest direction
_DPI = 110


@dataclass
class ReportFigure:
    """One figure of the report: the PNG it was saved to, or why it is missing."""

    name: str
    title: str
    file: str | None = None  # path relative to the report directory
    reason: str | None = None  # why it was not drawn


def draw_figures(numbers: dict[str, Any], directory: str, subdirectory: str = FIGURES_DIR) -> list[ReportFigure]:
    """Draw every figure the numbers have data for into `directory/subdirectory/<name>.png`.

    Figures without data (no test set, no identification) are not listed; those that could not be
    drawn (matplotlib missing) are listed with the reason, so the page can say what is missing and why.
    """
    planned = _planned_figures(numbers)
    try:
        figure_cls, canvas_cls = _import_matplotlib()
    except ImportError as err:
        reason = f"matplotlib is not installed ({err}); install it with `{PLOTS_INSTALL}`"
        logger.warning("Report figures skipped: %s.", reason)
        return [ReportFigure(name, title, reason=reason) for name, title, _ in planned]

    os.makedirs(os.path.join(directory, subdirectory), exist_ok=True)
    figures = []
    for name, title, draw in planned:
        figure = figure_cls(layout="constrained")
        canvas_cls(figure)
        draw(figure, numbers)
        relative = f"{subdirectory}/{name}.png"
        figure.savefig(os.path.join(directory, relative), dpi=_DPI, facecolor="white")
        figures.append(ReportFigure(name, title, file=relative))
    return figures


def _import_matplotlib() -> tuple[type, type]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


Drawer = Callable[[Any, dict[str, Any]], None]


def _planned_figures(numbers: dict[str, Any]) -> list[tuple[str, str, Drawer]]:
    """(name, title, drawer) of every figure the numbers have data for, in page order."""
    test, identification = numbers.get("test"), numbers.get("identification")
    planned: list[tuple[str, str, Drawer, bool]] = [
        ("accuracy", "Accuracy before and after the repair", _draw_accuracy, True),
        ("per_class", "Test accuracy per class", _draw_per_class, bool(test)),
        ("selection", "Choosing alpha on held-out verified samples", _draw_selection, bool(numbers["selection"]["points"])),
        ("spectra", "Energy spectrum of each clean space", _draw_spectra, bool(numbers.get("spaces"))),
        ("weight_change", "How much each weight changed", _draw_weight_change, bool(numbers.get("layers"))),
        ("confusion", "Test confusion matrices before and after", _draw_confusion, bool(test)),
        ("scores", "Distribution of identification scores", _draw_scores, bool(identification)),
    ]
    return [(name, title, draw) for name, title, draw, has_data in planned if has_data]


# --------------------------------------------------------------------------------------------
# figures


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _before_after_bars(ax: Any, before: list[float], after: list[float], ylabel: str, top: float) -> tuple[Any, Any]:
    """Paired before/after bars on a 0-100 axis with headroom for the legend; returns both bar containers."""
    x = np.arange(len(before))
    bars = (ax.bar(x - 0.2, before, width=0.38, color=BEFORE_COLOR, label="before"),
            ax.bar(x + 0.2, after, width=0.38, color=AFTER_COLOR, label="after"))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", frameon=False, fontsize=8, ncols=2)
    _style(ax)
    return bars


def _draw_accuracy(figure: Any, numbers: dict[str, Any]) -> None:
    metrics = numbers["metrics"]
    groups = [("held-out verified", metrics["accuracy_before"], metrics["accuracy_after"])]
    if numbers.get("test"):
        groups.append(("test", numbers["test"]["accuracy_before"], numbers["test"]["accuracy_after"]))
    figure.set_size_inches(2.2 + 1.8 * len(groups), 3.4)
    ax = figure.add_subplot()
    percent = lambda value: 100 * value if value is not None else math.nan  # noqa: E731
    bars = _before_after_bars(ax, [percent(g[1]) for g in groups], [percent(g[2]) for g in groups], "accuracy (%)", 118)
    for container in bars:
        ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups])


def _draw_per_class(figure: Any, numbers: dict[str, Any]) -> None:
    rows = numbers["test"]["per_class"]
    figure.set_size_inches(min(16, 2 + 0.55 * len(rows)), 3.6)
    ax = figure.add_subplot()
    before = [100 * r["accuracy_before"] if r["accuracy_before"] is not None else 0 for r in rows]
    after = [100 * r["accuracy_after"] if r["accuracy_after"] is not None else 0 for r in rows]
    _before_after_bars(ax, before, after, "test accuracy (%)", 115)
    if len(rows) <= 40:
        ax.set_xticks(np.arange(len(rows)), [r["name"] for r in rows], rotation=35 if len(rows) > 4 else 0,
                      ha="right" if len(rows) > 4 else "center")


def _draw_selection(figure: Any, numbers: dict[str, Any]) -> None:
    selection = numbers["selection"]
    metric = selection["metric"]
    points = selection["points"]
    figure.set_size_inches(6.4, 3.4)
    ax = figure.add_subplot()
    alphas = [p["alpha"] for p in points]
    values = [p.get(metric, math.nan) for p in points]
    ax.plot(alphas, values, "-o", color=AFTER_COLOR, markersize=4, label="projection (held-out folds)")
    if selection["baseline"] is not None:
        ax.axhline(selection["baseline"], color=BEFORE_COLOR, linestyle="--", linewidth=1.2, label="unrepaired model")
    chosen = selection["chosen_alpha"]
    if chosen is not None:
        chosen_value = next(p.get(metric, math.nan) for p in points if p["alpha"] == chosen)
        ax.plot([chosen], [chosen_value], "*", color="#f59e0b", markersize=15, markeredgecolor="black",
                markeredgewidth=0.6, label=f"chosen alpha = {chosen:g}", zorder=5)
    if min(alphas) > 0 and max(alphas) / min(alphas) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    ax.legend(frameon=False, fontsize=8)
    _style(ax)


def _draw_spectra(figure: Any, numbers: dict[str, Any]) -> None:
    spaces = numbers["spaces"]
    figure.set_size_inches(6.4, 3.8)
    ax = figure.add_subplot()
    colors = _colors(len(spaces))
    for color, (group, space) in zip(colors, spaces.items(), strict=True):
        share = np.asarray([s if s is not None else 0.0 for s in space["energy_share"]], dtype=float)
        # Directions below the rank tolerance hold round-off, not signal: they are not drawn.
        share = np.where(share > SPECTRUM_FLOOR * share.max(initial=0.0), share, np.nan)
        ax.plot(np.arange(1, len(share) + 1), share, color=color, linewidth=1.2, label=_short(group))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("direction (sorted by energy)")
    ax.set_ylabel("share of energy")
    if len(spaces) <= 12:
        ax.legend(frameon=False, fontsize=7, loc="lower left")
    _style(ax)


def _draw_weight_change(figure: Any, numbers: dict[str, Any]) -> None:
    layers = numbers["layers"]
    figure.set_size_inches(6.4, min(40, 1.0 + 0.24 * len(layers)))
    ax = figure.add_subplot()
    y = np.arange(len(layers))
    groups = list(dict.fromkeys(layer["group"] for layer in layers))
    palette = dict(zip(groups, _colors(len(groups)), strict=True))
    changes = [100 * layer["relative_change"] for layer in layers]
    ax.barh(y, changes, color=[palette[layer["group"]] for layer in layers])
    if not any(changes):
        ax.text(0.5, 0.5, "no weight changed (the repair was not adopted)", transform=ax.transAxes,
                ha="center", va="center", color="#6b7280")
        ax.set_xticks([])
    ax.set_yticks(y, [_short(layer["name"]) for layer in layers], fontsize=7 if len(layers) > 30 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("relative change ||W_after - W_before|| / ||W_before|| (%)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _draw_confusion(figure: Any, numbers: dict[str, Any]) -> None:
    test = numbers["test"]
    names = [r["name"] for r in test["per_class"]]
    n = len(names)
    side = min(7.0, 2.0 + 0.42 * n)
    panels = [(key, title) for key, title in (("confusion_before", "before"), ("confusion_after", "after")) if test[key]]
    figure.set_size_inches(len(panels) * side + 0.8, side)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=True):
        counts = np.asarray(test[key], dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{title}: {100 * test['accuracy_' + title]:.1f}% correct", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 20:
            ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(n), names, fontsize=7)
            if n <= 12:
                for i in range(n):
                    for j in range(n):
                        if counts[i, j]:
                            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=6,
                                    color="white" if rates[i, j] > 0.5 else "#111827")
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")


def _draw_scores(figure: Any, numbers: dict[str, Any]) -> None:
    identification = numbers["identification"]
    histogram = identification["score_histogram"]
    edges = np.asarray(histogram["edges"], dtype=float)
    figure.set_size_inches(6.4, 3.4)
    ax = figure.add_subplot()
    if "counts_corrupted" in histogram:
        ax.stairs(histogram["counts_clean"], edges, fill=True, alpha=0.55, color=CLEAN_COLOR, label="label was clean")
        ax.stairs(histogram["counts_corrupted"], edges, fill=True, alpha=0.55, color=CORRUPTED_COLOR,
                  label="label was corrupted")
    else:
        ax.stairs(histogram["counts"], edges, fill=True, alpha=0.7, color=AFTER_COLOR, label="all samples")
    threshold = identification["summary"].get("threshold")
    if isinstance(threshold, (int, float)) and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"flag threshold {threshold:.3g}")
    ax.set_xlabel("score (lower = more harmful)")
    ax.set_ylabel("training samples")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def _short(name: str, keep: int = 38) -> str:
    return name if len(name) <= keep else "…" + name[-(keep - 1):]


# --------------------------------------------------------------------------------------------
# thumbnails


def image_to_uint8(value: Any) -> np.ndarray:
    """A model input or a PIL image as an (H, W) or (H, W, 3|4) uint8 array for display.

    Channel-first float tensors (normalised `pixel_values`) are min-max scaled per image, so any
    normalisation displays; large images are shrunk to at most `THUMBNAIL_MAX_SIDE` pixels.
    """
    if hasattr(value, "convert") and hasattr(value, "mode"):  # a PIL image
        value = value.convert("RGBA" if "A" in value.mode else "RGB")
    array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Cannot show an array of shape {array.shape} as an image.")
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        finite = np.isfinite(array)
        low, high = (array[finite].min(), array[finite].max()) if finite.any() else (0.0, 0.0)
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        array = np.round(255 * np.where(finite, scaled, 0.0)).astype(np.uint8)
    step = math.ceil(max(array.shape[:2]) / THUMBNAIL_MAX_SIDE)
    return np.ascontiguousarray(array[::step, ::step])


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 arrays, got {array.dtype}; convert with image_to_uint8 first.")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"encode_png takes (H, W), (H, W, 3) or (H, W, 4) arrays, got shape {array.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
