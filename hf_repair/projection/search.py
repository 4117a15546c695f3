"""One-shot clean-space projection (Verifix, Kodge et al. 2024), with alpha chosen without an oracle.

One pass over the verified split accumulates a Gram per layer input *per fold* (or keeps the rows
while they are fewer than the input's width, `GramCollector`). For fold f the space is built from
the other folds (G_total - G_f) and scored on fold f, so every verified
sample is scored by a projection that never saw it; the pooled held-out score of each alpha is
compared with the unrepaired model's score on the same samples. The winning alpha is applied with
the space of the whole split, and only if it beats the unrepaired model by more than `min_improvement`
and by more than noise: the paired test `significance_test` on the held-out predictions of the chosen
alpha against the unrepaired model's on the same samples (`hf_repair.evaluation.significance`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RepairConfig
from ..data import LabeledBatch, VerifiedSplit, check_label_range
from ..evaluation import (
    ForwardFn,
    PairedComparison,
    compute_scores,
    predict,
    predict_by_fold,
    selection_value,
    significance_gate,
)
from ..modeling.layers import LayerAdapter
from ..modeling.weights import WeightSnapshot
from ..utils.distributed import is_main_process
from .capture import GramCollector
from .clean_space import CleanSpace
from .projector import Projector

logger = logging.getLogger(__name__)


@dataclass
class AlphaSearchResult:
    """What the projection decided, and the clean spaces it decided with."""

    alpha: float | None  # the best global alpha; None when the repair was not adopted
    layer_alphas: dict[str, float | None] | None  # alpha_scope="layer": per clean space (None: untouched)
    adopted: bool
    baseline_scores: dict[str, float]  # the unrepaired model on every verified sample
    chosen_scores: dict[str, float]  # the adopted choice, each sample scored by a space built without it
    comparison: PairedComparison  # the best choice's held-out predictions against the unrepaired model's
    alpha_scores: list[tuple[float, dict[str, float]]]  # the global alpha curve, alphas scored in full
    stopped_early: dict[float, float]  # alphas whose scoring stopped early -> the most accuracy they could have had
    spaces: dict[str, CleanSpace]  # of the whole split, per clean space; empty when not adopted (never decomposed)
    groups: dict[str, list[str]]
    input_dims: dict[str, int]  # per clean space
    num_samples: int
    timings: dict[str, float]  # seconds of capture, decomposition and selection


class AlphaSearch:
    """Chooses alpha (globally, or per clean space) by k-fold scores on the verified split, then applies it."""

    def __init__(self, model: nn.Module, config: RepairConfig, targets: dict[str, tuple[nn.Module, LayerAdapter]],
                 forward_fn: ForwardFn, compute_metrics: Any | None = None) -> None:
        self.model = model
        self.config = config
        self.targets = targets
        self.forward_fn = forward_fn
        self.compute_metrics = compute_metrics

    def run(self, split: VerifiedSplit, snapshot: WeightSnapshot) -> AlphaSearchResult:
        config = self.config
        k = split.num_folds
        dtype = torch.float64 if config.gram_dtype == "float64" else torch.float32
        num_local = split.num_local_samples()
        progress = tqdm(total=(1 + len(config.alphas)) * num_local, desc="hf_repair: projection", unit="sample",
                        disable=config.repair_disable_tqdm or not is_main_process())
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. One pass: per-fold Grams, plus the unrepaired model's predictions for the baseline.
        collector = GramCollector(self.targets, num_slots=k, dtype=dtype)

        def route(batch: LabeledBatch) -> None:
            collector.begin_batch(batch.fold, batch.inputs.get("attention_mask"))
            progress.update(len(batch.labels))

        with collector:  # fold by fold, so the samples line up with the held-out predictions of each alpha
            logits, labels, _ = predict_by_fold(self.model, split, self.forward_fn, before_forward=route)
        check_label_range(labels.cpu().numpy(), logits.shape[-1])
        unused = collector.never_called()
        if unused:
            logger.warning("These target layers never ran on the verified split and are left as they are: %s", unused)
        collector.all_reduce()
        groups = collector.groups()
        baseline = compute_scores(logits, labels, self.compute_metrics)
        baseline_correct = logits.argmax(-1) == labels
        baseline_value = selection_value(baseline, config.metric_for_selection)

        timings["capture_s"] = time.perf_counter() - start

        # 2. Fold f is scored with the space of the other folds (G_total - G_f), no further capture pass. Only
        # what the space of the whole split needs is kept past this (the summed Gram, or the rows): that space
        # is decomposed once a choice is adopted, and never for a repair that is not.
        start = time.perf_counter()
        selection_dtype = _selection_dtype(snapshot, self.targets)
        fold_spaces: list[dict[str, CleanSpace]] = [{} for _ in range(k)]
        for leader in groups:
            for fold in range(k):
                space = collector.space(leader, without=fold, solver_dtype=selection_dtype)
                fold_spaces[fold][leader] = replace(space, basis=space.basis.to(selection_dtype))
            collector.release_folds(leader)
        projectors = [Projector(self.targets, snapshot, groups, spaces) for spaces in fold_spaces]
        timings["decomposition_s"] = time.perf_counter() - start
        start = time.perf_counter()
        correct: dict[Any, torch.Tensor] = {}  # held-out correctness of every choice scored, for the paired test
        scored: dict[Any, dict[str, float]] = {}  # and its scores: no choice is scored twice
        untouched = _choice_key({leader: None for leader in groups})  # no projection: the capture pass scored it
        correct[untouched], scored[untouched] = baseline_correct, baseline
        num_samples = int(labels.numel())

        # Only our own accuracy is bounded by its count so far (a compute_metrics may redefine "accuracy").
        can_stop = (config.metric_for_selection == "accuracy" and config.repair_greater_is_better
                    and self.compute_metrics is None)
        best_correct = -1  # the most held-out samples right of any choice scored in full (not the unrepaired model)
        stopped: dict[Any, float] = {}  # choice -> the most accuracy it could have had when its scoring stopped

        def cross_validate(alpha: float | Mapping[str, float | None]) -> dict[str, float] | None:
            """The choice's pooled held-out scores, or None once it cannot reach `best_correct` (see module doc)."""
            nonlocal best_correct
            key = _choice_key(alpha)
            if key in stopped:
                return None
            if key in scored:
                return scored[key]
            fold_logits, fold_labels = [], []
            num_correct, num_seen = 0, 0
            for fold, projector in enumerate(projectors):
                projector.apply(alpha)
                logits_f, labels_f = predict(self.model, split.batches(fold), self.forward_fn,
                                             before_forward=lambda b: progress.update(len(b.labels)))
                fold_logits.append(logits_f)
                fold_labels.append(labels_f)
                # Gathered predictions: every process takes the same decision.
                num_correct += int((logits_f.argmax(-1) == labels_f).sum())
                num_seen += labels_f.numel()
                at_most = num_correct + num_samples - num_seen
                if can_stop and fold < k - 1 and at_most < best_correct:
                    stopped[key] = at_most / num_samples
                    return None
            heldout_logits, heldout_labels = torch.cat(fold_logits), torch.cat(fold_labels)
            correct[key] = heldout_logits.argmax(-1) == heldout_labels
            scored[key] = compute_scores(heldout_logits, heldout_labels, self.compute_metrics)
            best_correct = max(best_correct, int(correct[key].sum()))
            return scored[key]

        sign = 1.0 if config.repair_greater_is_better else -1.0

        def value(scores: dict[str, float]) -> float:
            return sign * selection_value(scores, config.metric_for_selection)

        alpha_scores = search_alphas(config.alphas, cross_validate, value, config.alpha_search)
        # The best alpha; the larger one on ties (closer to the trained model).
        best_alpha, best_scores = max(alpha_scores, key=lambda item: (value(item[1]), item[0]))
        choice: float | dict[str, float | None] = best_alpha
        if config.alpha_scope == "layer":
            progress.total += len(groups) * len(config.alphas) * num_local
            choice, best_scores = self._per_layer_search(groups, best_alpha, best_scores, cross_validate, value)
        snapshot.restore()
        projectors.clear()  # their rotated weights are not needed past the selection
        progress.total = progress.n  # coarse-to-fine scores fewer alphas than the grid the bar was sized for
        progress.close()
        timings["selection_s"] = time.perf_counter() - start

        # 3. Adopt the choice, with the space of the whole split, only if it beats no repair by a margin and
        # significantly, on the same held-out samples.
        comparison = significance_gate(correct[_choice_key(choice)], baseline_correct, config)
        adopted = value(best_scores) > sign * baseline_value + config.min_improvement and comparison.significant
        final_spaces: dict[str, CleanSpace] = {}
        if adopted:
            start = time.perf_counter()
            final_spaces = {leader: collector.space(leader) for leader in groups}
            timings["decomposition_s"] += time.perf_counter() - start
            Projector(self.targets, snapshot, groups, final_spaces).apply(choice)
        else:
            logger.info(
                "No alpha beat the unrepaired model on held-out verified samples by more than min_improvement and "
                "noise (%s %.4f vs best %.4f; %s, test %r); the model is left exactly as it was.",
                config.metric_for_selection, baseline_value, sign * value(best_scores), comparison.describe(),
                config.significance_test,
            )
        return AlphaSearchResult(
            alpha=best_alpha if adopted else None,
            layer_alphas=choice if adopted and isinstance(choice, dict) else None,
            adopted=adopted,
            baseline_scores=baseline,
            chosen_scores=best_scores if adopted else baseline,
            comparison=comparison,
            alpha_scores=alpha_scores,
            stopped_early={key: bound for key, bound in stopped.items() if not isinstance(key, tuple)},
            spaces=final_spaces,
            groups=groups,
            input_dims={leader: collector.dim(leader) for leader in groups},
            num_samples=num_samples,
            timings=timings,
        )

    def _per_layer_search(
        self,
        groups: dict[str, list[str]],
        start_alpha: float,
        start_scores: dict[str, float],
        cross_validate: Callable[[Mapping[str, float | None]], dict[str, float] | None],
        value: Callable[[dict[str, float]], float],
    ) -> tuple[dict[str, float | None], dict[str, float]]:
        """Coordinate ascent: each clean space in turn tries every alpha and no projection at all.

        Starts from the best global alpha and keeps a change only if the pooled held-out score
        strictly improves, so it can only match or beat the global choice on the verified folds.
        """
        choice: dict[str, float | None] = {leader: start_alpha for leader in groups}
        best_scores = start_scores
        candidates: list[float | None] = [None, *self.config.alphas]
        for leader in groups:
            for candidate in candidates:
                if candidate == choice[leader]:
                    continue
                trial = {**choice, leader: candidate}
                scores = cross_validate(trial)
                if scores is not None and value(scores) > value(best_scores):  # None: stopped, below the best
                    choice, best_scores = trial, scores
        return choice, best_scores


def search_alphas(
    alphas: list[float],
    cross_validate: Callable[[float], dict[str, float] | None],
    value: Callable[[dict[str, float]], float],
    strategy: str = "coarse_to_fine",
) -> list[tuple[float, dict[str, float]]]:
    """The (alpha, held-out scores) pairs scored in full, in alpha order.

    "grid" scores every alpha (one pass over the verified split each). "coarse_to_fine" scores
    every third alpha of the sorted grid and the last one, then walks from the best coarse alpha
    towards its better neighbour, at most two steps: 6 to 9 passes for the default 14-point grid,
    and the grid's choice whenever the held-out curve has one peak (ties going to the larger alpha,
    closer to the trained model, as in the final choice). Larger alphas are scored first. An alpha
    for which `cross_validate` returns None (stopped early: below an alpha already scored) ranks last.
    """
    if strategy == "grid" or len(alphas) <= 4:
        results = [(alpha, cross_validate(alpha)) for alpha in reversed(alphas)]
        return [(alpha, scores) for alpha, scores in reversed(results) if scores is not None]
    scored: dict[int, dict[str, float] | None] = {}

    def rank(index: int) -> tuple[float, float]:
        if index not in scored:
            scored[index] = cross_validate(alphas[index])
        scores = scored[index]
        return (-math.inf if scores is None else value(scores)), alphas[index]

    best = max(sorted({*range(0, len(alphas), 3), len(alphas) - 1}, reverse=True), key=rank)
    # With one peak, it lies within two steps of `best`, on the side of the better neighbour (if either is).
    for step in (-1, 1):
        if 0 <= best + step < len(alphas) and rank(best + step) > rank(best):
            if 0 <= best + 2 * step < len(alphas):
                rank(best + 2 * step)
            break
    return [(alphas[i], scores) for i, scores in sorted(scored.items()) if scores is not None]


def _selection_dtype(snapshot: WeightSnapshot, targets: dict[str, tuple[nn.Module, LayerAdapter]]) -> torch.dtype:
    """float32 for the fold spaces' eigendecompositions and projectors, unless a target weight is float64.

    They only score alphas: float32 halves the time of their products and eigendecompositions and the
    products' memory, and errs by about 1e-7 alpha on the weakest directions (on the repairs of
    tests/test_end_to_end.py, a CNN, a ViT and a fine-tuned MiniLM it left every alpha's held-out
    accuracy unchanged). The chosen alpha is applied from the float64 space of the whole split.
    """
    float64 = any(snapshot.original(name).dtype == torch.float64 for name in targets)
    return torch.float64 if float64 else torch.float32


def _choice_key(choice: float | Mapping[str, float | None]) -> Any:
    """A hashable key of a global alpha or a per-space choice; one alpha for every space is that global alpha."""
    if not isinstance(choice, Mapping):
        return choice
    alphas = set(choice.values())
    if len(alphas) == 1 and None not in alphas:
        return alphas.pop()
    return tuple(sorted(choice.items()))
