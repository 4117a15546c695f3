"""Method "auto": choose among the final weights and what the trajectory offers, by nested held-out verified folds.

The samples that pick an epoch (or a soup, or a head) must not also be the only evidence that judges
the final choice. So what is judged is a *selection procedure* (`candidates.py`), never one set of
weights:

1. For every verified fold f, each procedure is run on the other folds only -- it ranks the trajectory
   points, builds its average or soup, refits the head or builds the projection on them -- and the
   result predicts fold f. Pooling the folds gives each procedure one held-out prediction per verified
   sample, made by weights whose selection never saw that sample.
2. The base procedures (final, best, average, soup, fresh) are compared by pooled held-out accuracy; on
   ties the simpler one (in that order) wins. Then the refinements (head refit, projection, erase, retrain) are
   run on top of the best base from the trajectory the same way, fold by fold, and on top of `fresh` too where
   it beats that base (a trajectory base's refinement may still beat it: erase from the final weights did on
   a text run, BENCHMARKS.md); the best of those bases and their refinements is the candidate. Where that is
   `fresh` itself, its best erase, retrain or forward is the candidate instead, if it passes step 3: the folds
   judge such a refinement by fold runs that identify with a fold's `fresh`, fine-tuned on two thirds of the
   verified samples, while its refit (step 4) identifies with `fresh` fine-tuned on all of them. On text the
   refit measured above `fresh` on test on all six seeds where both ran, by 0.2-5.4 points, including one where
   the folds put `fresh` 6 of 300 samples ahead (BENCHMARKS.md).
3. The candidate replaces the final weights only if its gain over them is significant (the config's
   `significance_test` on the same samples' pooled held-out predictions against the final weights'
   predictions, which nothing was selected on) at `auto_significance_level` and larger than `min_improvement`.
4. The adopted procedure is then run once more on every verified sample, and its weights stay (fresh and the
   fine-tuning refinements on it: the average of several runs); erase, retrain and forward on a trajectory base
   end with the average of their judged fold runs instead, where that average is at least as accurate on the
   verified samples as its runs were held out (`candidates.py`).

Step 2 still picks the best of a handful of procedures on the pooled held-out predictions that step 3
tests, so the reported gain is slightly optimistic; the significance test and the small number of
procedures bound that. Candidates are compared by accuracy, the gate's measure (`metric_for_selection`
is not used here). Every number comes from predictions gathered over processes and every tie is
broken by a fixed order, so under `accelerate launch` all processes make the same choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import RepairConfig
from ..evaluation import PairedComparison, significance_gate
from ..utils.distributed import is_main_process
from .candidates import BASE_PROCEDURES, FINETUNING_REFINEMENTS, REFINEMENTS, CandidateBuilder

logger = logging.getLogger(__name__)


@dataclass
class TrajectoryChoice:
    """What `choose` decided, and every procedure's pooled held-out accuracy it decided with."""

    chosen: str  # the procedure whose weights the model ends with ("final": unchanged)
    candidate: str  # the procedure with the best pooled held-out accuracy, or the refinement of fresh step 2 prefers
    adopted: bool
    comparison: PairedComparison  # the candidate's held-out predictions against the final weights'
    heldout_accuracy: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # procedure -> why it could not run
    # where fresh led the folds and its refinement was taken (step 2): fresh's held-out predictions against it
    fresh_over_candidate: PairedComparison | None = None


def choose(builder: CandidateBuilder, config: RepairConfig) -> TrajectoryChoice:
    """Steps 1-3 of the module docstring; the model is left with whatever weights were loaded last."""
    trajectory = builder.trajectory
    folds = range(trajectory.num_folds)
    skipped = {}

    def runnable(names: tuple[str, ...]) -> list[str]:
        kept = []
        for name in names:
            if name in config.auto_candidates:
                problem = builder.check_procedure(name)
                if problem is None:
                    kept.append(name)
                else:
                    skipped[name] = problem
                    logger.info("method='auto' leaves out %s: %s.", name, problem)
        return kept

    bases = ["final", *runnable(BASE_PROCEDURES[1:])]
    refinements = runnable(REFINEMENTS)
    progress = tqdm(total=(len(bases) + len(refinements)) * len(folds), desc="hf_repair: auto", unit="fold",
                    disable=config.repair_disable_tqdm or not is_main_process())

    correct: dict[str, torch.Tensor] = {}

    def judge(procedure: str) -> None:
        pooled = torch.zeros_like(trajectory.labels, dtype=torch.bool)
        for fold in folds:
            held = trajectory.folds == fold
            pooled[held] = builder.heldout_predictions(procedure, fold) == trajectory.labels[held]
            progress.update()
        correct[procedure] = pooled
        builder.judged(procedure, accuracy(procedure))

    def accuracy(procedure: str) -> float:
        return float(correct[procedure].double().mean())

    for name in bases:
        judge(name)
    from_trajectory = [name for name in bases if name != "fresh"]
    refined = [max(from_trajectory, key=lambda name: (accuracy(name), -bases.index(name)))]
    if "fresh" in bases and accuracy("fresh") > accuracy(refined[0]):
        refined.append("fresh")  # refined too: the trajectory's refinements may still beat it (erase from final)
        progress.total += len(refinements) * len(folds)
    order = []
    for base in refined:
        order.append(base)
        for refinement in refinements:
            judge(f"{base}+{refinement}")
            order.append(f"{base}+{refinement}")
    progress.close()

    def gate(name: str) -> tuple[PairedComparison, bool]:
        comparison = significance_gate(correct[name], correct["final"], config, level=config.auto_significance_level)
        adopted = name != "final" and comparison.significant and accuracy(name) - accuracy("final") > config.min_improvement
        return comparison, adopted

    candidate = max(order, key=lambda name: (accuracy(name), -order.index(name)))
    comparison, adopted = gate(candidate)
    fresh_over_candidate = None
    fresh_finetunes = [name for name in order
                       if name.startswith("fresh+") and name.split("+")[1] in FINETUNING_REFINEMENTS]
    if candidate == "fresh" and fresh_finetunes:
        refit = max(fresh_finetunes, key=lambda name: (accuracy(name), -order.index(name)))
        refit_comparison, refit_adopted = gate(refit)
        if refit_adopted:
            fresh_over_candidate = significance_gate(correct["fresh"], correct[refit], config,
                                                     level=config.auto_significance_level)
            logger.info("method='auto' takes %s over fresh, which led it on the folds (%s): its refit identifies with "
                        "fresh fine-tuned on every verified sample.", refit, fresh_over_candidate.describe())
            candidate, comparison, adopted = refit, refit_comparison, refit_adopted
    heldout = {name: accuracy(name) for name in correct}
    logger.info("method='auto': held-out verified accuracy %s; %s %s over the final weights (%s).",
                ", ".join(f"{name} {value:.4f}" for name, value in heldout.items()), candidate,
                "adopted" if adopted else "not adopted", comparison.describe())
    return TrajectoryChoice(chosen=candidate if adopted else "final", candidate=candidate, adopted=adopted,
                            comparison=comparison, heldout_accuracy=heldout, skipped=skipped,
                            fresh_over_candidate=fresh_over_candidate)
