"""`choose` on given held-out correctness: which procedure it takes where `fresh` leads its refinements."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from hf_repair import RepairConfig
from hf_repair.trajectory.selection import choose

NUM_VERIFIED, NUM_FOLDS = 300, 3
CONFIG = RepairConfig(method="auto", repair_disable_tqdm=True, num_folds=NUM_FOLDS,
                      auto_candidates=["best", "fresh", "head_refit", "erase", "retrain"])


def right_on(count: int) -> torch.Tensor:
    """A procedure right on the first `count` verified samples (so any two share their discordant samples)."""
    return torch.arange(NUM_VERIFIED) < count


class JudgedBuilder:
    """Stands in for `CandidateBuilder`: each procedure predicts the held-out labels right where `correct` says."""

    def __init__(self, correct: dict[str, torch.Tensor]):
        labels = torch.arange(NUM_VERIFIED) % 10
        self.trajectory = SimpleNamespace(num_folds=NUM_FOLDS, folds=torch.arange(NUM_VERIFIED) % NUM_FOLDS,
                                          labels=labels)
        self.correct = correct

    def check_procedure(self, name: str) -> None:
        return None

    def heldout_predictions(self, procedure: str, fold: int) -> torch.Tensor:
        held = self.trajectory.folds == fold
        labels = self.trajectory.labels[held]
        return torch.where(self.correct[procedure][held], labels, (labels + 1) % 10)

    def judged(self, procedure: str, accuracy: float) -> None:
        pass


def judged(fresh: int, **refinements: int) -> JudgedBuilder:
    """final right on 150 samples, best on 160, fresh and its refinements as given (else 150)."""
    correct = {"final": right_on(150), "best": right_on(160)}
    correct["fresh"] = right_on(fresh)
    for base in ("best", "fresh"):
        for refinement in ("head_refit", "erase", "retrain"):
            correct[f"{base}+{refinement}"] = right_on(refinements.get(refinement, 150) if base == "fresh" else 150)
    return JudgedBuilder(correct)


def test_where_fresh_leads_its_best_fine_tuning_refinement_is_taken_and_gated():
    """fresh leads retrain by 6 of 300 and erase by 10 (as on text short seed 4): retrain is taken, the gate judges
    it, not fresh, against the final weights, and fresh's lead is recorded."""
    choice = choose(judged(fresh=220, retrain=214, erase=210, head_refit=220), CONFIG)
    assert choice.candidate == choice.chosen == "fresh+retrain" and choice.adopted
    assert (choice.fresh_over_candidate.wins, choice.fresh_over_candidate.losses) == (6, 0)
    assert (choice.comparison.wins, choice.comparison.losses) == (64, 0)


def test_fresh_stays_where_its_fine_tuning_refinements_do_not_pass_the_gate():
    """A head refit of fresh ahead of them is not taken instead: its refit identifies nothing."""
    choice = choose(judged(fresh=220, head_refit=219, retrain=152, erase=151), CONFIG)  # 2 and 1 wins of final
    assert choice.chosen == "fresh" and choice.fresh_over_candidate is None
    assert (choice.comparison.wins, choice.comparison.losses) == (70, 0)


def test_fresh_stays_where_its_refinement_would_fall_below_min_improvement():
    config = dataclasses.replace(CONFIG, min_improvement=0.231)  # fresh gains 70 of 300 over final, retrain 69
    choice = choose(judged(fresh=220, retrain=219), config)
    assert choice.chosen == "fresh" and choice.fresh_over_candidate is None


def test_a_refinement_of_fresh_that_leads_it_is_chosen_as_before():
    choice = choose(judged(fresh=220, retrain=230, erase=225), CONFIG)
    assert choice.chosen == "fresh+retrain" and choice.fresh_over_candidate is None


def test_a_trajectory_base_ahead_of_fresh_keeps_its_own_candidate():
    """fresh behind best is not refined at all, so nothing of fresh can be taken."""
    choice = choose(judged(fresh=155, retrain=219), CONFIG)
    assert choice.chosen == "best" and "fresh+retrain" not in choice.heldout_accuracy
