"""What `auto`'s nested folds cost identification when `fresh` identifies: each fold's identifier against one built on
every verified sample.

Inside `auto`, a fresh-based erase or retrain is judged fold by fold: on each verified fold's complement it builds
`fresh` (the initial weights fine-tuned on those samples alone, `runs_per_fold` runs averaged) and identifies the
harmful training samples with it and those samples; the weights `auto` ends with average those fold runs. On one
cached trajectory of `finetune_regime.py` this prints, against the known corruption, the identification of each
fold's `fresh`, of the average of the fold freshes on every verified sample (what `fresh` ends with), and of fresh
fine-tunes on every verified sample (`--runs` of them averaged), with each model's test accuracy.

    OMP_NUM_THREADS=1 nice python3 benchmarks/fold_identification.py --task text --regime short --seed 1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig
from hf_repair.data import column_array, stratified_folds
from hf_repair.identification import identify_harmful
from hf_repair.trajectory.candidates import average_weights
from hf_repair.trajectory.checkpoints import load_weights
from testbed.finetuning import load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import markdown_table
from retrain_budget import describe, fold_freshes, fresh_runs, positive_int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regime_benchmark.add_run_arguments(parser, task="text")
    parser.add_argument("--runs", type=positive_int, default=2,
                        help="Fresh fine-tunes averaged per fold and on every sample (auto's runs_per_fold).")
    args = parser.parse_args()
    regime_benchmark.quiet_scoring(args, logging.ERROR)

    run = regime_benchmark.noisy_run(args)
    task, recipe, run_dir = run.task, run.recipe, run.run_dir
    model = load_checkpoint(task.model_class, run.trajectory.final.path)
    # auto's fine-tunes: the Trainer's learning rate and batch size, no gate of their own (`inner_finetune_config`)
    config = RepairConfig(method="erase", **task.repair_kwargs, repair_seed=args.seed, repair_disable_tqdm=True,
                          retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size,
                          significance_test="none", min_improvement=-1.0)
    initial = task.new_model(args.seed).state_dict()
    labels, corrupted = column_array(task.test, "labels"), column_array(task.noisy, "is_corrupted").astype(bool)

    def row(name: str, state: dict, verified) -> list[str]:
        load_weights(model, state)
        test = 100 * np.mean(predictions(model, task.test) == labels)
        return [name, str(len(verified)), f"{test:.2f}", describe(identify_harmful(model, task.noisy, verified, config), corrupted)]

    folds = stratified_folds(column_array(task.verified, "labels"), config.num_folds, args.seed)
    fold_states = fold_freshes(model, initial, task.verified, config, run_dir, args.seed, args.runs)
    rows = []
    for fold, state in enumerate(fold_states):
        outside = task.verified.select(np.sort(np.concatenate([r for f, r in enumerate(folds) if f != fold])))
        rows.append(row(f"fold {fold}'s fresh", state, outside))
    rows.append(row("the average of the fold freshes", average_weights(fold_states, latest=0), task.verified))
    every = average_weights(fresh_runs(model, initial, task.verified, config, run_dir, args.seed, args.runs), latest=0)
    rows.append(row(f"fresh on every verified sample ({args.runs} runs averaged)", every, task.verified))
    print(f"{task.name} {args.regime} seed {args.seed}: load {os.getloadavg()[0]:.1f}")
    print(markdown_table(["identifier", "verified samples it learnt and probes with", "its test %",
                          "flagged, precision, recall, AUROC on the known corruption"], rows))


if __name__ == "__main__":
    main()
