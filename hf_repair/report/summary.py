"""The report as plain text (`summary.txt`, the command line's table) and the number formatting the page shares."""

from __future__ import annotations

from typing import Any

from .files import FLAGGED_CSV


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals ("n/a" when unknown)."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def delta(before: float | None, after: float | None) -> str:
    """The change between two fractions in percentage points."""
    return "n/a" if before is None or after is None else f"{100 * (after - before):+.2f} pts"


def fmt(value: Any) -> str:
    """A number with four significant digits, anything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def heldout_count(metrics: dict[str, Any]) -> int | None:
    """How many verified samples judged the repair.

    A fine-tune is judged on one held-out fold (`num_heldout`); a projection scores every verified
    sample with a repair built without it, so all `num_verified` count.
    """
    return metrics.get("num_heldout", metrics.get("num_verified"))


def contradictions(numbers: dict[str, Any]) -> list[str]:
    """Where the test data contradicts the repair's decision: adopted on held-out verified samples, yet test accuracy fell."""
    metrics, test = numbers["metrics"], numbers.get("test")
    if not numbers["adopted"] or not test or test["accuracy_before"] is None:
        return []
    if test["accuracy_after"] >= test["accuracy_before"]:
        return []
    return [
        f"The repair was adopted on the judgement of {heldout_count(metrics)} held-out verified samples "
        f"({pct(metrics['accuracy_before'])} -> {pct(metrics['accuracy_after'])}), but test accuracy fell "
        f"from {pct(test['accuracy_before'])} to {pct(test['accuracy_after'])} "
        f"({delta(test['accuracy_before'], test['accuracy_after'])}) on {test['num_samples']:,} test samples. "
        f"The verified split may be too small, or unlike the test data: check before keeping the repaired model."
    ]


def before_after_table(numbers: dict[str, Any]) -> str:
    """A short before/after accuracy table for a terminal."""
    rows = [("held-out verified", numbers["metrics"]["accuracy_before"], numbers["metrics"]["accuracy_after"],
             heldout_count(numbers["metrics"]))]
    if numbers.get("test"):
        test = numbers["test"]
        rows.append(("test", test["accuracy_before"], test["accuracy_after"], test["num_samples"]))
    lines = [f"{'accuracy':<20}{'before':>9}{'after':>9}{'change':>12}{'samples':>9}"]
    for label, before, after, count in rows:
        lines.append(f"{label:<20}{pct(before):>9}{pct(after):>9}{delta(before, after):>12}{count or '':>9}")
    return "\n".join(lines)


def summary_text(numbers: dict[str, Any]) -> str:
    """Every headline of the report as plain text (what `summary.txt` holds)."""
    metrics, selection = numbers["metrics"], numbers["selection"]
    status = "adopted" if numbers["adopted"] else "not adopted: nothing beat the unrepaired model, weights unchanged"
    lines = [f"hf_repair {numbers['method']} report ({status})", ""]
    for warning in numbers.get("warnings", []):
        lines += [f"WARNING: {warning}", ""]
    lines += [before_after_table(numbers), ""]
    if selection["points"]:  # a projection ran
        chosen = selection["chosen_alpha"]
        lines.append(f"alpha: {chosen:g}" if chosen is not None else "alpha: none adopted")
        lines.append(f"alphas tried: {len(selection['points'])}, scored by held-out {selection['metric']} on "
                     f"{numbers['config']['num_folds']} folds of {metrics.get('num_verified')} verified samples")
        stopped = metrics.get("alphas_stopped_early") or []
        if stopped:
            lines.append(f"  and {len(stopped)} stopped early, below the best at most: " + ", ".join(
                f"{row['alpha']:g} ({pct(row['accuracy_at_most'])})" for row in stopped))
    if metrics.get("num_flagged") is not None:  # a fine-tune ran
        lines.append(finetune_line(metrics))
        quality = [f"{k} {fmt(metrics[f'identification_{k}'])}" for k in ("precision", "recall", "auroc")
                   if metrics.get(f"identification_{k}") is not None]
        if quality:
            lines.append("  its flags against the known corruption: " + ", ".join(quality))
        lines += estimated_precision_lines(metrics, "identification_")
    fresh = metrics.get("fresh_identification")
    if fresh:  # method "auto" refitted a refinement of fresh
        lines.append(f"fresh's identification: {fresh['num_flagged']} of {fresh['num_samples']} training samples flagged")
        lines += estimated_precision_lines(fresh)
    layers = numbers["layers"]
    if layers:
        largest = max(layers, key=lambda layer: layer["relative_change"])
        lines.append(f"layers repaired: {len(layers)} in {len({layer['group'] for layer in layers})} clean spaces; largest change "
                     f"{100 * largest['relative_change']:.2f}% ({largest['name']})")
    test = numbers.get("test")
    if test:
        lines += ["", "test accuracy per class:", f"  {'class':<24}{'support':>8}{'before':>9}{'after':>9}{'change':>12}"]
        for row in test["per_class"]:
            lines.append(f"  {row['name'][:23]:<24}{row['support']:>8}{pct(row['accuracy_before']):>9}"
                         f"{pct(row['accuracy_after']):>9}{delta(row['accuracy_before'], row['accuracy_after']):>12}")
    ident = numbers.get("identification")
    if ident:
        summary = ident["summary"]
        lines += ["", f"identification: {ident['num_flagged']} of {ident['num_samples']} training samples flagged "
                      f"(rule: {summary.get('flag_rule', '?')}, threshold: {fmt(summary.get('threshold'))})"]
        quality = [f"{k} {fmt(summary[k])}" for k in ("precision", "recall", "auroc") if summary.get(k) is not None]
        if quality:
            lines.append("  against the known corruption: " + ", ".join(quality))
        lines += estimated_precision_lines(summary)
        lines.append(f"  {FLAGGED_CSV} lists every flagged sample, most suspect first.")
    if numbers.get("missing"):
        lines += ["", "not shown:"] + [f"  - {m['item']}: {m['reason']}" for m in numbers["missing"]]
    return "\n".join(lines)


def estimated_precision_lines(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The flags' precision and recall as identification estimated them without the truth (none if it did not)."""
    precision = values.get(f"{prefix}estimated_flag_precision")
    if precision is None:
        return []
    low, high = values.get(f"{prefix}estimated_flag_precision_interval") or (None, None)
    warned = values.get(f"{prefix}noise_rate_warning")
    unreliable = "; unreliable, as the noise rate: see its warning" if warned else ""
    return [f"  estimated without the truth: {pct(precision)} of the flags are wrong labels (interval {pct(low)} to "
            f"{pct(high)}), {pct(values.get(f'{prefix}estimated_flag_recall'))} of the wrong labels are flagged"
            + unreliable]


def finetune_line(metrics: dict[str, Any]) -> str:
    return (f"fine-tune: {metrics['steps']} steps ({metrics['epochs']:.2f} training epochs), "
            f"{metrics['num_flagged']} of {metrics['num_train']} training samples flagged, {metrics.get('stop_reason')}")
