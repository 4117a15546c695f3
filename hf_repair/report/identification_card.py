"""An identification summary written for a person: labelled rows with units, grouped by what they tell.

`Repairer.identify` returns its summary keyed for programs (`verified_pass_s`, `preconditioner`,
`noise_rate_estimates`, ...); `report.json` keeps those keys. The page shows each known key under a
label, with percentages, seconds and layer lists formatted, and drops values that were not measured
(None, NaN). A key this module does not know is shown under its words (`probe_l2` -> "Probe l2").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .class_names import class_name
from .summary import fmt, pct

Rows = list[tuple[str, str]]  # (label, value)

FLAG_RULES = {
    "noise_rate": "flag the estimated share of wrong labels, lowest scores first",
    "threshold": "flag every score below the threshold",
    "budget": "flag a fixed number or share of the lowest scores",
}
SCORES = {
    "probe": "probe fitted on the verified samples",
    "influence": "influence on the verified loss",
    "refit": "head refitted on the verified samples",
    "projection": "projection-repaired model",
    "combined": "combined ranks of several scores",
    "loss": "loss of the trained model",
}
NOISE_ESTIMATES = {
    "negative_influence": "the share of samples with harmful influence",
    "probe_disagreement": "the probe's disagreement with the given labels",
    "refit_disagreement": "the refitted head's disagreement with the given labels",
    "fresh_fold_models": "fresh's fold models, calibrated on the verified folds they did not learn",
}
FLAG_PRECISION_SOURCES = {
    "probe": "the probe's predictions on held-out verified samples",
    "refit": "the refitted head's predictions on held-out verified samples",
    "fresh_fold_models": "fresh's fold models' predictions on the verified folds they did not learn",
}
PRECONDITIONERS = {"exact": "exact", "kfac": "K-FAC", "identity": "none"}


def _count(value: Any) -> str:
    return f"{int(value):,}"


def _seconds(value: Any) -> str:
    value = float(value)
    if value < 60:
        return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _throughput(value: Any) -> str:
    return f"{float(value):,.1f} samples/s" if value < 100 else f"{float(value):,.0f} samples/s"


def _quality(value: Any) -> str:
    return f"{float(value):.3f}"


def _layers(value: Any) -> str:
    names = [str(name) for name in value]
    if not names:
        return "none"
    shown = ", ".join(names[:6]) + (f", and {len(names) - 6} more" if len(names) > 6 else "")
    return f"{len(names)}: {shown}" if len(names) > 1 else shown


def _preconditioners(value: dict[str, str]) -> str:
    by_kind: dict[str, list[str]] = {}
    for layer, kind in value.items():
        by_kind.setdefault(PRECONDITIONERS.get(kind, kind), []).append(layer)
    return "; ".join(f"{kind} for {', '.join(layers)}" for kind, layers in by_kind.items())


def _named(names: dict[str, str]) -> Callable[[Any], str]:
    return lambda value: names.get(str(value), _words(str(value)))


def _scores_by_name(value: dict[str, Any]) -> str:
    return "; ".join(f"{SCORES.get(name, _words(name))}: {_quality(v)}" for name, v in value.items() if _known(v))


# Known keys with nothing but a value, by group, in page order: key -> (label, how its value is written).
FIELD_GROUPS: list[tuple[str, dict[str, tuple[str, Callable[[Any], str]]]]] = [
    ("Against the known corruption", {
        "precision": ("Flagged samples whose label was wrong (precision)", pct),
        "recall": ("Wrong labels that were flagged (recall)", pct),
        "auroc": ("Score separates wrong from right labels (AUROC)", _quality),
        "auroc_by_score": ("AUROC of each score", _scores_by_name),
        "suggested_label_accuracy_on_corrupted": ("Suggested label is the true one, on wrong labels", pct),
    }),
    ("How the samples were scored", {
        "num_verified": ("Verified samples", _count),
        "trained_verified_accuracy": ("Trained model's accuracy on them", pct),
        "influence_layers": ("Layers the influence reads", _layers),
        "closed_form": ("Layers with closed-form gradients", _layers),
        "preconditioner": ("Curvature approximation", _preconditioners),
        "damping": ("Damping (relative to the mean eigenvalue)", fmt),
        "probe_layer": ("Layer the probe reads", str),
        "probe_l2": ("Probe L2 penalty", fmt),
        "probe_heldout_accuracy": ("Probe accuracy on held-out verified samples", pct),
        "refit_prox": ("Refit proximity penalty", fmt),
        "refit_heldout_accuracy": ("Refitted head's accuracy on held-out verified samples", pct),
    }),
    ("Time", {
        "identify_time_s": ("Total", _seconds),
        "verified_pass_s": ("Pass over the verified samples", _seconds),
        "projection_repair_s": ("Projection repair", _seconds),
        "train_pass_s": ("Pass over the training set", _seconds),
        "samples_per_second": ("Training samples per second, overall", _throughput),
        "train_pass_samples_per_second": ("Training samples per second, training-set pass", _throughput),
    }),
]
FLAG_KEYS = {"num_samples", "num_flagged", "flag_rule", "threshold", "score", "blind_classes"}
NOISE_KEYS = {"estimated_noise_rate", "noise_rate_source", "noise_rate_estimates", "noise_transition",
              "estimated_flag_precision", "estimated_flag_precision_interval", "estimated_flag_recall",
              "flag_precision_source"}
KNOWN_KEYS = FLAG_KEYS | NOISE_KEYS | {key for _, fields in FIELD_GROUPS for key in fields}


def identification_card(summary: dict[str, Any], num_flagged: int,
                        class_names: list[str] | None) -> list[tuple[str, Rows]]:
    """(group title, [(label, value)]) of an identification summary; groups with no measured value are left out."""
    groups = [
        ("Flags", _flag_rows(summary, num_flagged, class_names)),
        ("Wrong labels", _noise_rows(summary, class_names)),
        *((title, [(label, write(summary[key])) for key, (label, write) in fields.items() if _known(summary.get(key))])
          for title, fields in FIELD_GROUPS),
        ("Other", [(_words(key.removesuffix("_s")), _seconds(value) if key.endswith("_s") else _plain(value))
                   for key, value in summary.items() if key not in KNOWN_KEYS and _known(value)]),
    ]
    return [(title, rows) for title, rows in groups if rows]


def _flag_rows(summary: dict[str, Any], num_flagged: int, class_names: list[str] | None) -> Rows:
    total = summary.get("num_samples")
    rows = []
    if _known(total):
        rows.append(("Training samples scored", _count(total)))
    rows.append(("Flagged", f"{num_flagged:,}" + (f" ({pct(num_flagged / total)})" if _known(total) and total else "")))
    if _known(summary.get("flag_rule")):
        rows.append(("Flagging rule", _named(FLAG_RULES)(summary["flag_rule"])))
    if _known(summary.get("threshold")):
        rows.append(("Score threshold", fmt(summary["threshold"])))
    if _known(summary.get("score")):
        rows.append(("Score (lower = more harmful)", _named(SCORES)(summary["score"])))
    if summary.get("blind_classes"):
        rows.append(("Classes with no verified sample (harm to them is not seen)",
                     ", ".join(class_name(class_names, c) for c in summary["blind_classes"])))
    return rows


def _noise_rows(summary: dict[str, Any], class_names: list[str] | None) -> Rows:
    rows = []
    rate, source = summary.get("estimated_noise_rate"), summary.get("noise_rate_source")
    if _known(rate):
        origin = f", from {_named(NOISE_ESTIMATES)(source)}" if _known(source) else ""
        rows.append(("Estimated share of wrong labels", pct(rate) + origin))
    rows += [(f"Other estimate, from {_named(NOISE_ESTIMATES)(name)}", pct(value))
             for name, value in (summary.get("noise_rate_estimates") or {}).items() if name != source and _known(value)]
    transition = summary.get("noise_transition")
    if transition:
        rows.append(("Estimated share of right labels, by true class",
                     ", ".join(f"{class_name(class_names, c)} {pct(row[c])}" for c, row in enumerate(transition))))
    return rows + _flag_precision_rows(summary)


def _flag_precision_rows(summary: dict[str, Any]) -> Rows:
    """What share of the flags are likely wrong labels, estimated without the truth (`flag_precision.py`)."""
    precision, source = summary.get("estimated_flag_precision"), summary.get("flag_precision_source")
    if not _known(precision):
        return []
    low, high = summary.get("estimated_flag_precision_interval") or (math.nan, math.nan)
    interval = f" (interval {pct(low)} to {pct(high)})" if _known(low) and _known(high) else ""
    origin = f", from {_named(FLAG_PRECISION_SOURCES)(source)}" if _known(source) else ""
    unreliable = " (unreliable, as the noise rate: see its warning)" if summary.get("noise_rate_warning") else ""
    rows = [("Estimated share of the flags that are wrong labels", pct(precision) + interval + origin + unreliable)]
    if _known(summary.get("estimated_flag_recall")):
        rows.append(("Estimated share of the wrong labels flagged", pct(summary["estimated_flag_recall"])))
    return rows


def _known(value: Any) -> bool:
    """Whether a value was measured: not None, not NaN, not an empty mapping."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, dict) and not value)


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{_words(str(k))} {_plain(v)}" for k, v in value.items() if _known(v)) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt(value)


def _words(key: str) -> str:
    """`probe_l2` -> "Probe l2": a key this module does not know, as words."""
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]
