"""What `auto`'s significance gate costs and protects: its candidate on test at every gate level.

`auto` picks a candidate by pooled held-out verified accuracy, then adopts it over the final weights only if
the one-sided exact McNemar test on those held-out predictions finds it better at `significance_level`. The
candidate does not depend on the level, so one run with the gate off (`significance_test="none"`) gives the
candidate's test accuracy and its held-out p-value; the model at any level L is the candidate where p < L and
the final weights elsewhere. Per task, regime and seed (the cached trajectories of `finetune_regime.py`, with the
initial weights for retrain), this prints the gap closed at each level, the record against early stopping and
against the final weights, so a default level is chosen from what it adopts wrongly as well as what it misses.

    OMP_NUM_THREADS=1 nice python3 benchmarks/gate_level.py --json gate_full.json
    OMP_NUM_THREADS=1 nice python3 benchmarks/gate_level.py --lora --json gate_lora.json
    OMP_NUM_THREADS=1 nice python3 benchmarks/gate_level.py --lora --tasks text --regimes short --json gate_text.json
    python3 benchmarks/gate_level.py --summarize gate_full.json gate_lora.json gate_text.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from testbed.finetuning import finetune, load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import add_config_overrides, gap_closed, markdown_table

LEVELS = (0.05, 0.1, 0.2, 0.3, None)  # None: no test, any held-out gain is adopted


def run_setting(task: regime_benchmark.Task, regime: str, recipes: dict[str, regime_benchmark.Recipe], seed: int,
                args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipes[regime]
    run_dir = Path(args.cache_dir) / regime_benchmark.run_name(task, regime, recipe)
    train = lambda data, tag: finetune(task.new_model(seed), data, task.verified, run_dir / f"{tag}_s{seed}",  # noqa: E731
                                       recipe.epochs, recipe.lr, recipe.batch_size, seed)
    noisy_run, clean_run = train(task.noisy, "noisy"), train(task.clean, "clean")
    labels = column_array(task.test, "labels")
    accuracy = lambda model: float(np.mean(predictions(model, task.test) == labels))  # noqa: E731
    final = load_checkpoint(task.model_class, noisy_run.final.path)
    row: dict[str, Any] = {
        "task": task.name, "regime": regime, "seed": seed, "load": os.getloadavg()[0],
        "noisy": accuracy(final), "clean": accuracy(load_checkpoint(task.model_class, clean_run.final.path)),
        "early_stop": accuracy(load_checkpoint(task.model_class, noisy_run.best)),
    }
    config = RepairConfig(method="auto", **task.repair_kwargs, repair_seed=seed, repair_disable_tqdm=True,
                          retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size,
                          significance_test="none", num_folds=args.num_folds)
    config = dataclasses.replace(config, **dict(args.set))  # --set wins over the settings above
    model = copy.deepcopy(final)
    start = time.perf_counter()
    result = Repairer(model, config).repair(task.verified, task.noisy, checkpoints=noisy_run.output_dir,
                                            initial_weights=task.new_model(seed).state_dict())
    m = result.metrics
    row.update(candidate=m["candidate"], candidate_test=accuracy(model) if m["adopted"] else row["noisy"],
               adopted_without_gate=m["adopted"], p_value=m["p_value"], wins=m["wins"], losses=m["losses"],
               heldout=m["heldout_accuracy"], fold_run_averages=m.get("fold_run_averages", {}),
               num_folds=config.num_folds, auto_s=time.perf_counter() - start,
               epoch_s=regime_benchmark.epoch_seconds(final, task.noisy, recipe))  # timed at the same load
    print(f"  {task.name} {regime} seed {seed}: candidate {row['candidate']} test {row['candidate_test']:.4f} "
          f"(final {row['noisy']:.4f}, early stop {row['early_stop']:.4f}), p = {row['p_value']:.3g}; fold-run averages "
          f"checked: {row['fold_run_averages']}", flush=True)
    return row


def test_at_level(row: dict[str, Any], level: float | None) -> float:
    """The model's test accuracy had the gate run at `level` (None: no test)."""
    adopted = row["adopted_without_gate"] and (level is None or row["p_value"] < level)
    return row["candidate_test"] if adopted else row["noisy"]


def gaps(group: list[dict[str, Any]], accuracy: Callable[[dict[str, Any]], float]) -> list[float]:
    """The gap closed in % by `accuracy(row)` on each seed of a setting."""
    return [100 * gap_closed(accuracy(r), r["noisy"], r["clean"]) for r in group]


def record(differences: list[float]) -> str:
    return f"{sum(d > 0 for d in differences)}-{sum(d == 0 for d in differences)}-{sum(d < 0 for d in differences)}"


def summarize(rows: list[dict[str, Any]]) -> str:
    settings: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault((row["task"], row["regime"]), []).append(row)
    names = [f"p < {level:g}" if level is not None else "no test" for level in LEVELS]
    gap, versus_es, versus_final = [], [], []
    averages: dict[str, list[float]] = {name: [] for name in ["early stop", *names]}
    for (task, regime), group in settings.items():
        cells = [gaps(group, lambda r: r["early_stop"])]
        cells += [gaps(group, lambda r, lv=lv: test_at_level(r, lv)) for lv in LEVELS]
        for name, values in zip(averages, cells, strict=True):
            averages[name].append(float(np.mean(values)))
        gap.append([task, regime, len(group)] + [f"{np.mean(v):.0f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.0f}"
                                                 for v in cells])
        versus_es.append([task, regime] + [record([test_at_level(r, lv) - r["early_stop"] for r in group])
                                           for lv in LEVELS])
        versus_final.append([task, regime] + [record([test_at_level(r, lv) - r["noisy"] for r in group])
                                              for lv in LEVELS])
    gap.append(["average", "", len(rows)] + [f"{np.mean(v):.0f}" for v in averages.values()])
    seeds = [[r["task"], r["regime"], r["seed"], r["candidate"], f"{r['p_value']:.3g}", f"{r['wins']}-{r['losses']}",
              f"{100 * r['noisy']:.2f}", f"{100 * r['early_stop']:.2f}", f"{100 * r['candidate_test']:.2f}",
              f"{r['auto_s'] / r['epoch_s']:.1f}" if "epoch_s" in r else "n/a"]
             for r in rows]
    return "\n\n".join([
        "Gap closed on test in %, mean ± std over seeds, by the gate's level:",
        markdown_table(["task", "regime", "seeds", "early stop"] + names, gap),
        "Against early stopping on test, seeds better-equal-worse:",
        markdown_table(["task", "regime"] + names, versus_es),
        "Against the final weights on test, seeds better-equal-worse:",
        markdown_table(["task", "regime"] + names, versus_final),
        "Per seed: the candidate, its held-out McNemar p-value and wins-losses over the final weights, test %, and "
        "auto's wall time in training epochs of the noisy run (one timed right after it):",
        markdown_table(["task", "regime", "seed", "candidate", "p", "wins-losses", "final", "early stop",
                        "candidate", "auto, epochs"], seeds),
    ])


def main() -> None:
    parser = regime_benchmark.cached_runs_parser(__doc__)
    parser.add_argument("--num-folds", type=int, default=RepairConfig.num_folds,
                        help="auto's verified folds (RepairConfig.num_folds).")
    add_config_overrides(parser, "retrain_epochs=10")
    args = parser.parse_args()
    regime_benchmark.run_cached_settings(args, run_setting, summarize)

if __name__ == "__main__":
    main()
