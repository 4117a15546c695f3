"""`RepairResult`: what a repair did, the numbers that justify it, and how to undo it."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import RepairConfig
from .modeling.sharding import weight_access_for
from .modeling.weights import WeightSnapshot
from .projection.clean_space import CleanSpace
from .projection.pipeline import LayerRecord, ProjectionResult
from .projection.projector import Projector
from .projection.saving import (
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    RESULT_NAME,
    SPACES_NAME,
    check_original_weights,
    find_saved_layers,
    load_clean_spaces,
    save_clean_spaces,
    weight_fingerprint,
)
from .utils.files import atomic_directory, read_json, write_json

logger = logging.getLogger(__name__)


@dataclass
class RepairResult:
    """Returned by `Repairer.repair`.

    `metrics` holds `accuracy_before` / `accuracy_after` (held-out verified samples: each scored by
    a clean space built without it), the chosen `alpha`, whether the repair was `adopted`, and time.
    """

    config: RepairConfig
    metrics: dict[str, Any]
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    spaces: dict[str, CleanSpace] = field(default_factory=dict)
    selection: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _snapshot: WeightSnapshot | None = field(default=None, repr=False)

    @classmethod
    def from_projection(cls, config: RepairConfig, projection: ProjectionResult) -> RepairResult:
        return cls.from_repair(config, projection.metrics, projection.snapshot, projection)

    @classmethod
    def from_repair(cls, config: RepairConfig, metrics: dict[str, Any], snapshot: Any,
                    projection: ProjectionResult | None = None) -> RepairResult:
        """A result whose `undo()` restores `snapshot`, with the clean spaces and alpha curve of `projection` if one ran."""
        return cls(config=config, metrics=metrics, layers=projection.layers if projection is not None else {},
                   spaces=projection.spaces if projection is not None else {},
                   selection=projection.selection if projection is not None else [], _snapshot=snapshot)

    @property
    def snapshot(self) -> WeightSnapshot | None:
        """The original weights of the repaired layers (or of the whole model); None for a result loaded from disk."""
        return self._snapshot

    @property
    def adopted(self) -> bool:
        return bool(self.metrics.get("adopted", False))

    def undo(self) -> None:
        """Restore every repaired weight to its exact value before the repair."""
        if self._snapshot is None:
            raise RuntimeError("This result holds no snapshot of the original weights, so it cannot undo.")
        self._snapshot.restore()

    def __repr__(self) -> str:
        """A line, not the clean spaces' tensors (a saved BERT repair prints megabytes otherwise)."""
        m = self.metrics
        parts = [f"method={self.config.method!r}", f"adopted={self.adopted}"]
        if m.get("accuracy_before") is not None and m.get("accuracy_after") is not None:
            parts.append(f"heldout_accuracy={m['accuracy_before']:.4f}->{m['accuracy_after']:.4f}")
        if m.get("alpha") is not None:
            parts.append(f"alpha={m['alpha']:g}")
        parts.append(f"layers={len(self.layers)}")
        if self._snapshot is None and self.layers:
            parts.append("loaded (no undo)")
        return f"RepairResult({', '.join(parts)})"

    def summary(self) -> str:
        m = self.metrics
        lines = [f"hf_repair {self.config.method}: {'adopted' if self.adopted else 'not adopted (model unchanged)'}"]
        lines.append(f"  held-out verified accuracy: {m['accuracy_before']:.4f} -> {m['accuracy_after']:.4f}")
        if m.get("alpha") is not None:
            lines.append(f"  alpha: {m['alpha']:g}")
        if m.get("chosen") is not None:  # method "auto" (hf_repair.trajectory)
            heldout = ", ".join(f"{name} {value:.4f}" for name, value in m["heldout_accuracy"].items())
            lines.append(f"  chosen: {m['chosen']} (held-out verified accuracy: {heldout})")
        if isinstance(m.get("projection"), dict):  # a projection stage before another repair
            lines.append(_significance_line("projection gain", m["projection"]))
        if m.get("p_value") is not None:  # the significance gate (hf_repair.evaluation.significance)
            lines.append(_significance_line("head refit gain" if m.get("head_refit_adopted") is not None else "gain", m))
        if m.get("num_flagged") is not None:  # the fine-tuning methods (hf_repair.retention)
            lines.append(f"  flagged: {m['num_flagged']} of {m['num_train']}, fine-tune: {m['steps']} steps "
                         f"({m['epochs']:.2f} training epochs), stop reason: {m['stop_reason']}")
        lines.append(f"  layers: {m['num_layers']}, verified samples: {m['num_verified']}, time: {m['repair_time_s']:.1f}s")
        return "\n".join(lines)

    def report(
        self,
        directory: str | os.PathLike,
        *,
        model: nn.Module | None = None,
        test_dataset: Any | None = None,
        identification: Any | None = None,
        train_dataset: Any | None = None,
        class_names: list[str] | None = None,
        overwrite: bool = False,
        top_n: int = 48,
        **kwargs: Any,
    ) -> str:
        """Write a static HTML report (with its PNG figures, `report.json` and `summary.txt`); return its path.

        See `hf_repair.report.write_report` for every argument (`forward_fn`, `collate_fn`, `batch_size`).
        """
        from .report.writer import write_report

        page = write_report(
            self, directory, model=model, test_dataset=test_dataset, identification=identification,
            train_dataset=train_dataset, class_names=class_names, overwrite=overwrite, top_n=top_n, **kwargs,
        )
        logger.info("Wrote the repair report to %s", page)
        return page

    # --------------------------------------------------------------------------------------------
    # saving, loading and re-applying

    def groups(self) -> dict[str, list[str]]:
        """Clean space (named by its first layer) -> the layers that share it, in model order."""
        out: dict[str, list[str]] = {}
        for name, record in self.layers.items():
            out.setdefault(record.group, []).append(name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable report: config, metrics, per-layer records and the alpha sweep."""
        return {
            "config": self.config.to_dict(),
            "metrics": dict(self.metrics),
            "layers": {name: dataclasses.asdict(record) for name, record in self.layers.items()},
            "selection": [{"alpha": alpha, "scores": dict(scores)} for alpha, scores in self.selection],
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the repair so it can be re-applied to the same checkpoint, inspected or undone.

        The directory gets `repair_config.json`, `repair_result.json` (metrics, alpha sweep, per-layer
        name, kind, group, weight shape and fingerprint) and `clean_spaces.safetensors` (basis and
        energies of every clean space). It is written to a temporary sibling and renamed into place.
        Only projection repairs are saved this way: a fine-tuning repair changed every weight, so save
        the repaired model itself (`model.save_pretrained`).
        """
        self._check_reapplicable()
        self._check_consistent()
        layers = {name: self._completed_record(record) for name, record in self.layers.items()}
        report = self.to_dict()
        del report["config"]  # repair_config.json is the one source of the config
        report["layers"] = {name: dataclasses.asdict(record) for name, record in layers.items()}
        report["clean_spaces"] = {group: space.num_rows for group, space in self.spaces.items()}
        report["format_version"] = FORMAT_VERSION
        with atomic_directory(save_directory, overwrite=overwrite) as staging:
            self.config.save_pretrained(staging)
            save_clean_spaces(self.spaces, staging / SPACES_NAME)
            write_json(staging / RESULT_NAME, report)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> RepairResult:
        """Load a repair written by `save_pretrained` (on CPU). Apply it with `apply_to(model)`."""
        directory = Path(directory)
        if not (directory / RESULT_NAME).is_file():
            raise FileNotFoundError(
                f"No {RESULT_NAME} in {directory}; point to a directory written by RepairResult.save_pretrained."
            )
        report = read_json(directory / RESULT_NAME)
        if report.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{directory} holds a saved repair in format {report.get('format_version')!r}; this hf_repair "
                f"reads formats {list(READABLE_FORMAT_VERSIONS)}. Use the hf_repair version that wrote it."
            )
        layers = {}
        for name, record in report["layers"].items():
            record = dict(record, weight_shape=tuple(record["weight_shape"]))
            layers[name] = LayerRecord(**record)
        result = cls(
            config=RepairConfig.from_pretrained(directory),
            metrics=report["metrics"],
            layers=layers,
            spaces=load_clean_spaces(directory / SPACES_NAME, report["clean_spaces"]),
            selection=[(float(entry["alpha"]), entry["scores"]) for entry in report["selection"]],
        )
        result._check_consistent()
        return result

    def apply_to(self, model: nn.Module, *, check_weights: bool = True) -> RepairResult:
        """Re-apply this repair to `model` in place, and return a result whose `undo()` reverts it.

        `model` must be the checkpoint the repair was made on: every weight becomes W_original M(alpha)
        with the saved clean spaces, bit-identical to the original repair on the same device. Nothing
        changes and `RepairMismatchError` lists the differences if a layer is missing or has another
        kind or weight shape, or (with `check_weights`) if a weight is not the one the repair started
        from, e.g. because the repair was already applied. A repair that was not adopted changes nothing.
        """
        self._check_reapplicable()
        self._check_consistent()
        targets = find_saved_layers(model, {name: record.kind for name, record in self.layers.items()})
        # The snapshot reads each full weight (also when sharded): checked first, then projected or restored.
        snapshot = WeightSnapshot.of_targets(targets, weight_access_for(model))
        check_original_weights(
            {name: snapshot.original(name) for name in targets},
            shapes={name: record.weight_shape for name, record in self.layers.items()},
            fingerprints={name: record.weight_sha256 for name, record in self.layers.items()} if check_weights else None,
        )
        if not self.adopted:
            logger.info("This repair was not adopted (no alpha beat the unrepaired model): the model is left as it is.")
            return dataclasses.replace(self, metrics=dict(self.metrics), _snapshot=snapshot)

        groups = self.groups()
        # Compute on each group's own device, as the repair did, so the result is bit-identical.
        spaces = {}
        for group, space in self.spaces.items():
            device = snapshot.modules[groups[group][0]].weight.device
            spaces[group] = CleanSpace(space.basis.to(device), space.energies.to(device), space.num_rows)
        try:
            Projector(targets, snapshot, groups, spaces).apply(self.group_alphas())
        except BaseException:
            snapshot.restore()
            raise
        logger.info("Re-applied the saved repair to %d layers.", len(targets))
        return dataclasses.replace(self, metrics=dict(self.metrics), _snapshot=snapshot)

    def group_alphas(self) -> dict[str, float | None]:
        """The alpha applied to each clean space (None: its layers were left as trained)."""
        return {record.group: record.alpha for record in self.layers.values()}

    def _completed_record(self, record: LayerRecord) -> LayerRecord:
        """The record with the original weight's shape and fingerprint, read from the snapshot if needed."""
        if record.weight_shape is not None and record.weight_sha256 is not None:
            return record
        if self._snapshot is None:
            raise ValueError(
                f"Layer {record.name!r} has no recorded weight shape or fingerprint and this result holds no "
                f"snapshot of the original weights; save the result Repairer.repair returned."
            )
        original = self._snapshot.original(record.name)
        return dataclasses.replace(record, weight_shape=tuple(original.shape), weight_sha256=weight_fingerprint(original))

    def _check_reapplicable(self) -> None:
        if self.config.method != "projection":
            raise ValueError(
                f"A {self.config.method!r} repair fine-tuned every weight; it cannot be saved or re-applied as clean "
                f"spaces. Save the repaired model itself (model.save_pretrained / trainer.save_model)."
            )

    def _check_consistent(self) -> None:
        missing = sorted({r.group for r in self.layers.values()} - set(self.spaces))
        if missing and self.adopted:  # a repair that was not adopted decomposed no space: it changes nothing
            raise ValueError(f"This repair has no clean space for the layer groups {missing}; it cannot be re-applied.")
        wrong_dim = [r.name for r in self.layers.values()
                     if r.group in self.spaces and self.spaces[r.group].dim != r.input_dim]
        if wrong_dim:
            raise ValueError(f"The clean spaces of {wrong_dim} do not match their layers' input dimension.")
        if self.adopted and self.metrics.get("alpha") is None:
            raise ValueError("This repair is marked adopted but has no alpha; it cannot be re-applied.")


def _significance_line(label: str, m: dict[str, Any]) -> str:
    """The gain a gate judged, its interval and p-value, and its verdict."""
    low, high = m["gain_ci"]
    verdict = "significant" if m["significant"] else "not significant"
    return (f"  {label}: {m['gain']:+.4f}, {1 - m['significance_level']:.0%} CI [{low:+.4f}, {high:+.4f}], McNemar "
            f"p = {m['p_value']:.3g} ({m['wins']} wins, {m['losses']} losses; {m['significance_test']}: {verdict})")
