"""The report page: one static HTML file with its CSS inlined, its figures as data URIs and no JavaScript.

The page loads nothing (its Content-Security-Policy allows no network, no script), so the file
alone can be mailed or attached to an issue. Every number on it comes from the report's numbers,
the same that `report.json` holds.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .figures import ReportFigure
from .files import FLAGGED_CSV, REPORT_JSON, SAMPLES_DIR
from .identification_card import identification_card
from .summary import fmt, heldout_count, pct

TEXT_SHOWN = 600  # characters of a text sample shown on the page (report.json keeps more)
FigureHtml = Callable[[str], str]  # figure name -> its <figure>, a note that it is missing, or ""


@cache
def _stylesheet() -> str:
    return resources.files(__package__).joinpath("style.css").read_text(encoding="utf-8")


def render_html(numbers: dict[str, Any], figures: list[ReportFigure], directory: Path,
                thumbnails: dict[int, bytes]) -> str:
    """The page of `numbers`, with the figures saved under `directory` and the gallery's thumbnails embedded."""
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
    if numbers["warnings"]:
        badge += ' <span class="badge warn">but test accuracy fell</span>'
    warnings = "".join(f'<div class="warning" role="alert"><b>Check this repair.</b> {_e(w)}</div>'
                       for w in numbers["warnings"])
    verdict = ("The repair beat the unrepaired model on held-out verified samples and was applied."
               if adopted else "No alpha beat the unrepaired model on held-out verified samples, so every weight "
               "was left exactly as it was.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>hf_repair report: {_e(numbers['method'])}</title>
<style>{_stylesheet()}</style></head>
<body><header><div class="wrap">
<h1>Repair report {badge}</h1>
<p class="sub">{_e(numbers['method'])} &middot; {_e(verdict)}</p>
<nav>{nav}</nav></div></header>
<main class="wrap">
{warnings}
{_cards(numbers)}
{_missing_box(numbers)}
{body}
<footer>hf_repair {_e(numbers['hf_repair_version'])} &middot; written {_e(numbers['created'])} &middot;
every number on this page is in <a href="{REPORT_JSON}">{REPORT_JSON}</a></footer>
</main></body></html>
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _delta_html(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return '<span class="flat">n/a</span>'
    change = 100 * (after - before)
    css = "up" if change > 1e-9 else "down" if change < -1e-9 else "flat"
    return f'<span class="{css}">{change:+.2f} pts</span>'


def _card(label: str, value: str, note: str = "") -> str:
    return f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{value}</div><div class="note">{note}</div></div>'


def _before_after(before: float | None, after: float | None) -> str:
    return f'{pct(before)}<span class="arrow">&rarr;</span>{pct(after)}'


def _heldout_note(metrics: dict[str, Any]) -> str:
    count = heldout_count(metrics)
    note = f"{count:,} held-out verified samples" if count is not None else "held-out verified samples"
    if "num_heldout" in metrics and metrics.get("num_verified") is not None:
        note += f" (one fold of {metrics['num_verified']:,})"
    return note


def _cards(numbers: dict[str, Any]) -> str:
    metrics = numbers["metrics"]
    cards = [_card("Held-out verified accuracy", _before_after(metrics["accuracy_before"], metrics["accuracy_after"]),
                   f"{_delta_html(metrics['accuracy_before'], metrics['accuracy_after'])} &middot; "
                   f"{_heldout_note(metrics)}")]
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
                           f"{len({layer['group'] for layer in layers})} clean spaces &middot; largest change {100 * largest:.1f}%"))
    ident = numbers.get("identification")
    if ident:
        share = ident["num_flagged"] / max(ident["num_samples"], 1)
        cards.append(_card("Flagged training samples", f"{ident['num_flagged']:,}",
                           f"of {ident['num_samples']:,} ({100 * share:.1f}%)"))
    quality = _flag_quality(numbers)
    if quality:
        cards.append(_card("Flags vs known corruption", " / ".join(f"{v:.2f}" for _, v in quality),
                           " / ".join(name for name, _ in quality)))
    return f'<div class="cards">{"".join(cards)}</div>'


def _missing_box(numbers: dict[str, Any]) -> str:
    if not numbers["missing"]:
        return ""
    items = "".join(f"<li><b>{_e(m['item'])}</b>: {_e(m['reason'])}</li>" for m in numbers["missing"])
    return f'<div class="missing"><b>Not shown in this report</b><ul>{items}</ul></div>'


def _accuracy_section(numbers: dict[str, Any], figure: FigureHtml) -> str:
    metrics = numbers["metrics"]
    rows = [("held-out verified", metrics["accuracy_before"], metrics["accuracy_after"], heldout_count(metrics))]
    test = numbers.get("test")
    if test:
        rows.append(("test", test["accuracy_before"], test["accuracy_after"], test["num_samples"]))
    table = _table(["data", "samples", "before", "after", "change"],
                   [[_e(r[0]), _e(r[3] if r[3] is not None else "?"), pct(r[1]), pct(r[2]), _delta_html(r[1], r[2])]
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
            [[_e(r["name"]), str(r["support"]), pct(r["accuracy_before"]), pct(r["accuracy_after"]),
              _delta_html(r["accuracy_before"], r["accuracy_after"])] for r in test["per_class"]],
        )
        parts += ["<h3>Test accuracy per class</h3>", figure("per_class"), _collapsible(per_class, len(test["per_class"]), "classes")]
    else:
        parts.append(figure("per_class"))
    return "".join(parts)


def _selection_section(numbers: dict[str, Any], figure: FigureHtml) -> str:
    selection = numbers["selection"]
    metric = selection["metric"]
    points = selection["points"]
    keys = [metric] + sorted({k for p in points for k in p if k not in ("alpha", metric)})
    rows = []
    for p in points:
        chosen = selection["chosen_alpha"] is not None and p["alpha"] == selection["chosen_alpha"]
        cells = [f"{p['alpha']:g}" + (" &#9733;" if chosen else "")] + [fmt(p.get(k)) for k in keys]
        rows.append((cells, "chosen" if chosen else ""))
    baseline = selection["baseline"]
    intro = (f"<p>Each alpha was scored by held-out {_e(metric)} on the verified folds; the unrepaired model scores "
             f"{fmt(baseline)}. The best alpha is adopted only if it beats that.</p>")
    table = _table(["alpha"] + [_e(k) for k in keys], rows)
    return intro + f'<div class="grid2">{figure("selection")}<div class="table-wrap">{table}</div></div>'


def _layers_section(numbers: dict[str, Any], figure: FigureHtml) -> str:
    spaces, layers = numbers["spaces"], numbers["layers"]
    intro = ("<p>Left: how the verified inputs of each clean space spread their energy over directions (a steep drop "
             "means few directions carry the clean signal). Right: how far each weight moved, "
             "&#8214;W<sub>after</sub> &minus; W<sub>before</sub>&#8214; / &#8214;W<sub>before</sub>&#8214;.</p>")
    if not spaces:
        intro = ("<p>No alpha was adopted, so the clean spaces of the whole verified split were not decomposed (no "
                 "spectra, no ranks) and every weight is as trained.</p>")
    rows = [[_e(layer["name"]), _e(layer["kind"]), _e(layer["group"]), str(layer["input_dim"]),
             "-" if layer["rank"] is None else str(layer["rank"]),
             str(spaces.get(layer["group"], {}).get("directions_for_90", "-")), f"{100 * layer['relative_change']:.2f}%"]
            for layer in layers]
    table = _table(["layer", "kind", "clean space", "input dim", "rank", "dirs for 90%", "change"], rows, name_columns=(0, 2))
    return (intro + f'<div class="grid2">{figure("spectra")}{figure("weight_change")}</div>'
            + _collapsible(table, len(rows), "layers"))


def _confusion_section(numbers: dict[str, Any], figure: FigureHtml) -> str:
    if not numbers.get("test"):
        return '<div class="missing">No test data was given: pass test_dataset= and model= to see confusion matrices.</div>'
    return "<p>Rows are true classes, columns predictions; each row is normalised to its class size.</p>" + figure("confusion")


def _samples_section(numbers: dict[str, Any], figure: FigureHtml, thumbnails: dict[int, bytes]) -> str:
    ident = numbers.get("identification")
    if not ident:
        return _samples_not_shown(numbers)
    card = identification_card(ident["summary"], ident["num_flagged"], numbers["class_names"])
    parts = [
        f"<p>Every training sample was scored; lower scores are more harmful. {ident['num_flagged']:,} samples were "
        f'flagged: <a href="{FLAGGED_CSV}">{FLAGGED_CSV}</a> lists all of them, most suspect first, for relabelling.</p>',
        f'<div class="grid2">{figure("scores")}<div class="table-wrap">{_facts_table(card)}</div></div>',
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
        content = f"<blockquote>{_e(text[:TEXT_SHOWN])}{'…' if len(text) > TEXT_SHOWN else ''}</blockquote>"
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
            f'<dt>score</dt><dd>{_e(fmt(sample["score"]))}</dd></dl></div>')


def _samples_not_shown(numbers: dict[str, Any]) -> str:
    """What the report knows of the flags without the per-sample table: nothing, or a fine-tune's counts."""
    metrics = numbers["metrics"]
    if metrics.get("num_flagged") is None:
        return ('<div class="missing">Identification did not run: pass identification=Repairer(...).identify(...) '
                "and train_dataset= to see the score distribution and the most suspect training samples.</div>")
    quality = ", ".join(f"{name} {value:.2f}" for name, value in _flag_quality(numbers))
    against = f"; against the known corruption: {quality}" if quality else ""
    return (f"<p>The fine-tune scored its training samples and flagged {metrics['num_flagged']:,} of "
            f"{metrics['num_train']:,}{_e(against)}.</p>"
            f'<div class="missing">The per-sample identification table was not passed, so the score distribution, '
            f"the most suspect samples and {FLAGGED_CSV} are not shown: pass identification=Repairer(...).identify(...) "
            "and train_dataset= to see them.</div>")


def _flag_quality(numbers: dict[str, Any]) -> list[tuple[str, float]]:
    """Precision, recall and AUROC of the flags against the known corruption, where measured."""
    ident = numbers.get("identification")
    found = ident["summary"] if ident else {k.removeprefix("identification_"): v for k, v in numbers["metrics"].items()}
    names = {"precision": "precision", "recall": "recall", "auroc": "AUROC"}
    return [(label, found[key]) for key, label in names.items() if found.get(key) is not None]


def _facts_table(groups: list[tuple[str, list[tuple[str, str]]]]) -> str:
    rows = []
    for title, facts in groups:
        rows.append(f'<tr class="group"><th colspan="2">{_e(title)}</th></tr>')
        rows += [f"<tr><td>{_e(label)}</td><td>{_e(value)}</td></tr>" for label, value in facts]
    return f'<table class="facts"><tbody>{"".join(rows)}</tbody></table>'


def _files_section(numbers: dict[str, Any]) -> str:
    in_samples = f"{SAMPLES_DIR}/"
    links = "".join(f'<li><a href="{_e(f)}">{_e(f)}</a></li>' for f in numbers["files"] if not f.startswith(in_samples))
    samples = sum(f.startswith(in_samples) for f in numbers["files"])
    extra = f"<li>{in_samples}: {samples} thumbnails</li>" if samples else ""
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
