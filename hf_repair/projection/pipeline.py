"""The whole projection repair of a model: choose its layers, read the verified split, search alpha, record.

`project` is what `Repairer(method="projection")` runs, and what identification (the projection score)
and the fine-tuning methods (`projection+retention`) call directly for their projected model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import RepairConfig
from ..evaluation import ForwardFn, MetricFn, default_forward, eval_mode, split_verified
from ..modeling.layers import LayerAdapter
from ..modeling.sharding import weight_access_for
from ..modeling.targets import find_target_modules
from ..modeling.weights import WeightSnapshot
from .clean_space import CleanSpace
from .search import AlphaSearch, AlphaSearchResult

logger = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """One repaired layer: which clean space it used and how much its weight moved."""

    name: str
    kind: str
    group: str  # the layer whose input Gram it shares (itself when alone)
    input_dim: int
    rank: int | None  # of the clean space; None when the repair was not adopted (the space was not decomposed)
    relative_change: float
    weight_shape: tuple[int, ...] | None = None  # of the original weight, in the module's layout
    weight_sha256: str | None = None  # of the original weight; computed by save_pretrained
    alpha: float | None = None  # the alpha applied to this layer; None: left as trained


@dataclass
class ProjectionResult:
    """What `project` did: metrics, one record per layer, the clean spaces, the alpha curve, and the snapshot."""

    metrics: dict[str, Any]
    layers: dict[str, LayerRecord]
    spaces: dict[str, CleanSpace]
    selection: list[tuple[float, dict[str, float]]]
    snapshot: WeightSnapshot = field(repr=False)

    @property
    def adopted(self) -> bool:
        return bool(self.metrics["adopted"])


def check_materialized(model: nn.Module) -> None:
    """Refuse a model without real weights before anything reads or changes it."""
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"The model has {len(meta)} parameters on the meta device (e.g. {meta[:3]}); load real weights "
            f"first (from_pretrained without device_map='meta', or model.to_empty(...) plus load_state_dict)."
        )
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters to repair.")


def project(
    model: nn.Module,
    config: RepairConfig,
    verified: Any,
    *,
    forward_fn: ForwardFn = default_forward,
    collate_fn: Any | None = None,
    compute_metrics: MetricFn | Any | None = None,
) -> ProjectionResult:
    """Project `model`'s target layers in place onto the clean spaces of `verified`; restored on any error.

    The projection is adopted only if it beats the unrepaired model on held-out verified samples;
    otherwise every weight is left bit-identical (`result.adopted` is False).
    """
    start = time.perf_counter()
    check_materialized(model)
    targets = find_target_modules(model, config.target_modules, config.exclude_modules)
    split = split_verified(model, verified, config, forward_fn, collate_fn)
    snapshot = WeightSnapshot.of_targets(targets, weight_access_for(model))
    try:
        with eval_mode(model):
            search = AlphaSearch(model, config, targets, forward_fn, compute_metrics).run(split, snapshot)
    except BaseException:
        snapshot.restore()
        raise
    return _result(search, config, targets, snapshot, time.perf_counter() - start)


def _result(search: AlphaSearchResult, config: RepairConfig, targets: dict[str, tuple[nn.Module, LayerAdapter]],
            snapshot: WeightSnapshot, seconds: float) -> ProjectionResult:
    metric = config.metric_for_selection
    chosen = search.chosen_scores
    metrics: dict[str, Any] = {
        "accuracy_before": search.baseline_scores["accuracy"],
        "accuracy_after": chosen["accuracy"],
        "alpha": search.alpha,
        "adopted": search.adopted,
        "num_verified": search.num_samples,
        "num_layers": sum(len(m) for m in search.groups.values()),
        "num_clean_spaces": len(search.groups),
        # alphas whose held-out scoring stopped once it could not reach the best; not in the selection curve
        "alphas_stopped_early": [{"alpha": alpha, "accuracy_at_most": bound}
                                 for alpha, bound in sorted(search.stopped_early.items())],
        "repair_time_s": seconds,
        **{f"{phase.removesuffix('_s')}_time_s": value for phase, value in search.timings.items()},
    }
    metrics.update(search.comparison.as_metrics())
    if metric != "accuracy":
        metrics[f"{metric}_before"] = search.baseline_scores[metric]
        metrics[f"{metric}_after"] = chosen[metric]
    layers = {
        name: LayerRecord(
            name=name,
            kind=targets[name][1].kind,
            group=leader,
            input_dim=search.input_dims[leader],
            rank=search.spaces[leader].rank() if leader in search.spaces else None,
            relative_change=snapshot.relative_change(name),
            weight_shape=tuple(snapshot.original(name).shape),
            alpha=_layer_alpha(search, leader),
        )
        for leader, members in search.groups.items()
        for name in members
    }
    return ProjectionResult(metrics=metrics, layers=layers, spaces=search.spaces, selection=search.alpha_scores,
                            snapshot=snapshot)


def _layer_alpha(search: AlphaSearchResult, leader: str) -> float | None:
    """The alpha applied to a clean space's layers; None where the layers were left as trained."""
    if not search.adopted:
        return None
    return search.layer_alphas[leader] if search.layer_alphas is not None else search.alpha
