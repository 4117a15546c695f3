"""`auto`'s "fresh" procedure on test, fold by fold: what its judged fold runs reach, their average, one more refit.

`auto` judges "fresh" (the initial weights fine-tuned on verified samples alone) on nested folds: each fold's
run is fine-tuned on the other folds and predicts the held-out one. The weights it then ends with are the
uniform average of those fold runs. This script shows why, on one cached trajectory of `finetune_regime.py`:
per learning rate scale, the pooled held-out accuracy `auto` judged, each fold run's test accuracy, their
average's, and that of one more fine-tune on every verified sample (what `auto` ended with before: the same
fine-tune, early-stopped on an inner fold of all the samples).

    OMP_NUM_THREADS=1 nice python3 benchmarks/fresh_folds.py --task text --regime long --seed 0 --scales 1 0.5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from hf_repair.evaluation import default_forward, split_verified
from hf_repair.retention import RetentionRepair
from hf_repair.trajectory.averaging import average_weights
from hf_repair.trajectory.checkpoints import load_weights
from hf_repair.trajectory.fresh import FreshBuilder
from testbed.finetuning import load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regime_benchmark.add_run_arguments(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="Learning rate scales (of the run's learning rate) to measure, one at a time.")
    args = parser.parse_args()
    regime_benchmark.quiet_scoring(args, logging.ERROR)

    run = regime_benchmark.noisy_run(args)
    task, recipe = run.task, run.recipe
    final = load_checkpoint(task.model_class, run.trajectory.final.path)
    labels = column_array(task.test, "labels")
    accuracy = lambda model: f"{100 * np.mean(predictions(model, task.test) == labels):.2f}"  # noqa: E731

    fold_runs: dict[int, dict] = {}
    fresh_weights = FreshBuilder.weights

    def keep_fold_runs(builder: FreshBuilder, fold: int | None) -> dict:
        weights = fresh_weights(builder, fold)
        if fold is not None:
            fold_runs[fold] = {key: value.clone() for key, value in weights.items()}
        return weights

    FreshBuilder.weights = keep_fold_runs  # the fold runs auto judges, kept for their test accuracy
    rows = []
    for scale in args.scales:
        fold_runs.clear()
        config = RepairConfig(method="auto", **task.repair_kwargs, repair_seed=args.seed, repair_disable_tqdm=True,
                              retention_learning_rate=recipe.lr * scale, retention_batch_size=recipe.batch_size,
                              significance_test="none", auto_candidates=["fresh"], fresh_learning_rate_scales=[1.0])
        initial = task.new_model(args.seed).state_dict()
        metrics = Repairer(copy.deepcopy(final), config).repair(task.verified, checkpoints=run.trajectory.output_dir,
                                                                 initial_weights=initial).metrics
        model = copy.deepcopy(final)
        folds = []
        for fold in sorted(fold_runs):
            load_weights(model, fold_runs[fold])
            folds.append(accuracy(model))
        load_weights(model, average_weights([fold_runs[f] for f in sorted(fold_runs)], latest=0))
        averaged = accuracy(model)
        # one more fine-tune on every verified sample, as auto ended with before
        load_weights(model, initial)
        refit = dataclasses.replace(config, method="erase", min_improvement=-1.0)
        split = split_verified(model, task.verified, refit, default_forward, None)
        RetentionRepair(model, refit, forward_fn=default_forward, collate_fn=None,
                        compute_metrics=None).run_on_verified(task.verified, split, config.fresh_epochs)
        rows.append([f"{recipe.lr * scale:.3g}", f"{100 * metrics['heldout_accuracy']['fresh']:.1f}",
                     ", ".join(folds), averaged, accuracy(model)])
    print(f"{task.name} {args.regime} seed {args.seed}: final weights {accuracy(final)}% on test, held out "
          f"{100 * metrics['heldout_accuracy']['final']:.1f}%; load {os.getloadavg()[0]:.1f}")
    print(markdown_table(["learning rate", "fresh held out %", "fold runs, test %", "their average, test %",
                          "one more fine-tune on all, test %"], rows))


if __name__ == "__main__":
    main()
