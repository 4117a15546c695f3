"""The retrain refinement run alone, on the whole verified split, for several budgets (`retrain_epochs`).

`auto` judges retrain on nested verified folds and adopts it only on a significant held-out gain; this
script shows what the procedure itself reaches on test, without the judging: on one cached trajectory of
`finetune_regime.py` (vision task; `--lora` for its LoRA runs), it identifies the harmful training samples
with the final (or early-stopped) model as erase does, loads the seeded initial weights the run started
from, and runs the erase fine-tune from them for each budget. `--base trajectory` identifies with every
checkpoint of the run instead: the mean of their probe scores ranks the samples, and the first checkpoint's
flag count (the model that memorised least) says how many to drop. `--repair-seeds` runs each budget once per
seed and adds the uniform average of those runs' weights.

    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --regime short --seed 0 --epochs 3 10
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --base trajectory --repair-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig
from hf_repair.data import column_array
from hf_repair.identification import IdentificationResult, auroc, identify_harmful
from hf_repair.retention import repair_with_finetuning
from hf_repair.trajectory.checkpoints import load_weights
from testbed.finetuning import Trajectory, average_states, finetune, load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import markdown_table


def flagged_option(value: str) -> str:
    """'identified', 'corrupted' or a positive count, checked before anything loads."""
    if value in ("identified", "corrupted") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"expected 'identified', 'corrupted' or a positive number of samples, got {value!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", default="short", choices=["short", "long"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, nargs="+", default=[3.0], help="retrain_epochs budgets to run.")
    parser.add_argument("--base", default="final", choices=["final", "early_stop", "trajectory"],
                        help="The model that identifies (trajectory: every checkpoint, see above).")
    parser.add_argument("--repair-seeds", type=int, nargs="+", default=None,
                        help="Run each budget once per repair seed and add the average of their weights "
                             "(default: the run's seed, once).")
    parser.add_argument("--lora", action="store_true", help="The LoRA runs of finetune_regime.py --lora.")
    parser.add_argument("--flagged", default="identified", type=flagged_option,
                        help="What retrain drops: 'identified' (the library's flags), 'corrupted' (the known "
                             "corruption), or a number K (the K samples with the lowest identification score).")
    regime_benchmark.add_cache_arguments(parser)
    args = parser.parse_args()
    regime_benchmark.quiet_scoring(args, logging.ERROR)

    task = regime_benchmark.vision_task(args.seed, regime_benchmark.FULL["vision"], args)
    recipes = regime_benchmark.FULL["vision"].regimes
    if args.lora:
        task, recipes = regime_benchmark.with_lora(task, args.seed), regime_benchmark.LORA["vision"]
    recipe = recipes[args.regime]
    run_dir = Path(args.cache_dir) / regime_benchmark.run_name(task, args.regime, recipe)
    run = finetune(task.new_model(args.seed), task.noisy, task.verified, run_dir / f"noisy_s{args.seed}",
                   recipe.epochs, recipe.lr, recipe.batch_size, args.seed)
    labels = column_array(task.test, "labels")
    accuracy = lambda model: float(np.mean(predictions(model, task.test) == labels))  # noqa: E731
    base = load_checkpoint(task.model_class, run.best if args.base == "early_stop" else run.final.path)
    # as auto's retrain: the erase fine-tune with the Trainer's learning rate and batch size, no gate of its own
    config = RepairConfig(method="erase", **task.repair_kwargs, repair_seed=args.seed, repair_disable_tqdm=True,
                          retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size,
                          significance_test="none", min_improvement=-1.0)
    identification = (trajectory_identification(run, task, config) if args.base == "trajectory"
                      else identify_harmful(base, task.noisy, task.verified, config))
    corrupted = column_array(task.noisy, "is_corrupted").astype(bool)
    if args.flagged != "identified":
        flagged = (np.flatnonzero(corrupted) if args.flagged == "corrupted"
                   else np.sort(np.argsort(column_array(identification.table, "score"))[:int(args.flagged)]))
        identification = dataclasses.replace(identification, flagged_indices=flagged)
    initial = task.new_model(args.seed).state_dict()  # the seeded initialisation the noisy run started from
    rows = [["none (the base)", "", f"{100 * accuracy(base):.2f}", "", "", ""]]
    for epochs in args.epochs:
        runs = []
        for repair_seed in args.repair_seeds or [args.seed]:
            model = copy.deepcopy(base)
            load_weights(model, initial)
            start = time.perf_counter()
            result = repair_with_finetuning(
                model, dataclasses.replace(config, retention_epochs=epochs, repair_seed=repair_seed),
                task.verified, task.noisy, identification)
            m = result.metrics
            rows.append([f"{epochs:g}", str(repair_seed), f"{100 * accuracy(model):.2f}",
                         f"{m['steps']} of {m['max_steps']}", m["stop_reason"], f"{time.perf_counter() - start:.0f}"])
            runs.append({name: p.detach().clone() for name, p in model.state_dict().items()})
        if len(runs) > 1:
            load_weights(model, average_states(runs))
            rows.append([f"{epochs:g}", "average of the above", f"{100 * accuracy(model):.2f}", "", "", ""])
    flagged = identification.flagged_indices
    identified_by = "every checkpoint" if args.base == "trajectory" else f"the {args.base} model"
    print(f"{task.name} {args.regime} seed {args.seed}, flagged: {args.flagged} (by {identified_by}): "
          f"{len(flagged)}, precision {corrupted[flagged].mean():.3f}, recall {corrupted[flagged].sum() / corrupted.sum():.3f}; "
          f"load {os.getloadavg()[0]:.1f}")
    print(markdown_table(["retrain_epochs", "repair seed", "test %", "steps", "stop", "seconds"], rows))


def trajectory_identification(run: Trajectory, task: regime_benchmark.Task, config: RepairConfig) -> IdentificationResult:
    """Samples ranked by the mean probe score over every checkpoint; as many flagged as the first checkpoint flags."""
    results = [identify_harmful(load_checkpoint(task.model_class, c.path), task.noisy, task.verified, config)
               for c in run.checkpoints]
    mean_score = np.mean([column_array(r.table, "score") for r in results], axis=0)
    count = len(results[0].flagged_indices)
    corrupted = column_array(task.noisy, "is_corrupted").astype(bool)
    print("AUROC on the known corruption by epoch: " + ", ".join(
        f"{c.epoch}: {r.summary['auroc']:.3f} ({len(r.flagged_indices)} flagged)" for c, r in zip(run.checkpoints, results, strict=True)
    ) + f"; the mean score: {auroc(mean_score, corrupted):.3f}")
    return dataclasses.replace(results[-1], flagged_indices=np.sort(np.argsort(mean_score)[:count]))


if __name__ == "__main__":
    main()
