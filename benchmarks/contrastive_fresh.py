"""The contrastive `fresh` alone: hf_repair's pair fine-tune on the verified split, its head refitted, on test.

`method="auto"` with `fresh_objective="contrastive"` builds `fresh` (and each fold's) as
`hf_repair.retention.contrastive.contrastive_finetune` on the weights training started from, then the head
refitted on the same verified samples. This script builds that model once on every verified sample, for each
`--setting FEATURES ITERATIONS LEARNING_RATE` asked for, and prints its test accuracy and the gap it closes between
the cached noisy run's final and clean models: which features to pair and how long to train, without auto's folds.
With `--lora` the model is the LoRA fine-tune's (finetune_regime.py --lora), and the pairs train its adapter alone.

    OMP_NUM_THREADS=1 nice python3 benchmarks/contrastive_fresh.py --task text --seed 0 \\
        --setting token_mean 10 5e-5 --setting head_inputs 20 2e-5
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_repair import RepairConfig, Repairer
from hf_repair.evaluation import default_forward
from hf_repair.retention.contrastive import contrastive_finetune
from testbed.finetuning import finetune, load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regime_benchmark.add_run_arguments(parser, task="text")
    parser.add_argument("--setting", nargs=3, action="append", metavar=("FEATURES", "ITERATIONS", "LEARNING_RATE"),
                        help="fresh_contrastive_features, _iterations and _learning_rate of one run (repeatable); "
                             "default: auto 10 5e-5, auto's (features 'auto': the token mean for token ids, else "
                             "the head's inputs).")
    parser.add_argument("--lora", action="store_true", help="The LoRA fine-tunes, as finetune_regime.py --lora.")
    args = parser.parse_args()
    regime_benchmark.quiet_scoring(args, logging.ERROR)
    noisy = regime_benchmark.noisy_run(args, lora=args.lora)
    task, recipe = noisy.task, noisy.recipe
    labels = np.asarray(task.test["labels"])
    accuracy = lambda model: float(np.mean(predictions(model, task.test) == labels))  # noqa: E731
    clean_run = finetune(task.new_model(args.seed), task.clean, task.verified, noisy.run_dir / f"clean_s{args.seed}",
                         recipe.epochs, recipe.lr, recipe.batch_size, args.seed)  # cached beside the noisy run
    final = accuracy(load_checkpoint(task.model_class, noisy.trajectory.final.path))
    clean = accuracy(load_checkpoint(task.model_class, clean_run.final.path))
    rows = []
    for features, iterations, learning_rate in args.setting or [("auto", "10", "5e-5")]:
        config = RepairConfig(method="head_refit", **task.repair_kwargs, repair_seed=args.seed, repair_disable_tqdm=True,
                              retention_batch_size=recipe.batch_size, fresh_contrastive_features=features,
                              fresh_contrastive_iterations=int(iterations),
                              fresh_contrastive_learning_rate=float(learning_rate))
        model = task.new_model(args.seed)  # the weights training started from
        start = time.perf_counter()
        result = contrastive_finetune(model, model.get_submodule(task.head), task.verified, config, default_forward)
        Repairer(model, dataclasses.replace(config, significance_test="none", min_improvement=-1.0)).repair(task.verified)
        test = accuracy(model)
        rows.append([features, iterations, learning_rate, str(result.steps), f"{result.final_loss:.4f}",
                     f"{100 * test:.2f}", f"{100 * (test - final) / (clean - final):.0f}%",
                     f"{time.perf_counter() - start:.0f}"])
    print(f"{task.name} {args.regime} seed {args.seed}: final {100 * final:.2f}, clean {100 * clean:.2f}")
    print(markdown_table(["features", "iterations", "learning rate", "steps", "final pair loss", "test %", "gap closed",
                          "seconds"], rows))


if __name__ == "__main__":
    main()
