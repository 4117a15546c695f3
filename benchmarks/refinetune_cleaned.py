"""Re-fine-tuning from the pretrained weights on the training set hf_repair's identification cleaned.

A direction for issue 11, measured before it is built: in the fine-tuning regime the repairs of the
final weights stay below early stopping when the model barely memorised its noise (`finetune_regime.py`),
because what separates it from the clean model is what the noise did to learning, not what it memorised.
Identification still finds the corrupted samples there (precision 0.95, recall 0.8 on vision). So, per
task, regime and seed, on the trajectories `finetune_regime.py` caches (same data, recipes and seeds), this
script identifies the harmful samples (library defaults) on the final and on the early-stopped model, builds
the training set without them ("drop") or with the identification's suggested label for them
("relabel"), adds the verified split, and fine-tunes the *pretrained* model on it again with the short
regime's recipe (fewer epochs, so the noise that is left is not memorised). Scored on test next to the final
model, early stopping, the clean-trained ceiling and `method="auto"`; costs in noisy-training epochs.

    OMP_NUM_THREADS=1 nice python3 benchmarks/refinetune_cleaned.py --json refit_full.json
    OMP_NUM_THREADS=1 nice python3 benchmarks/refinetune_cleaned.py --lora --json refit_lora.json
    python3 benchmarks/refinetune_cleaned.py --summarize refit_full.json refit_lora.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from hf_repair.identification import IdentificationResult
from testbed.finetuning import finetune, load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import gap_closed, markdown_table

# (how the flagged samples are treated, which model identified them)
VARIANTS = (("drop", "final"), ("drop", "early_stop"), ("relabel", "early_stop"))
COLUMNS = ["early_stop", "auto"] + [f"{treat}_{base}" for treat, base in VARIANTS]
LABELS = {"early_stop": "early stop", "auto": "auto", "drop_final": "re-fine-tune, flagged by final dropped",
          "drop_early_stop": "re-fine-tune, flagged by early stop dropped",
          "relabel_early_stop": "re-fine-tune, flagged by early stop relabelled"}


def training_labels(task: regime_benchmark.Task, identification: IdentificationResult,
                    treatment: str) -> tuple[np.ndarray, np.ndarray]:
    """The training samples kept and their labels: without the flagged ones ("drop"), or all of them
    with the identification's suggested label for the flagged ones ("relabel")."""
    flagged = np.asarray(identification.flagged_indices, dtype=int)
    labels = column_array(task.noisy, "labels").copy()
    if treatment == "drop":
        kept = np.setdiff1d(np.arange(len(labels)), flagged)
        return kept, labels[kept]
    labels[flagged] = np.asarray(identification.table["suggested_label"])[flagged]
    return np.arange(len(labels)), labels


def cleaned_training_set(task: regime_benchmark.Task, kept: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """The kept training samples with `labels`, plus the verified split, in the verified split's columns."""
    verified = task.verified
    train = task.noisy.select_columns(verified.column_names).select(kept).remove_columns("labels")
    # add_column flattens the selection and loses the image feature types: cast back to the verified split's
    train = train.add_column("labels", labels.tolist()).cast(verified.features)
    data = datasets.concatenate_datasets([train, verified])
    return data.with_format(task.noisy.format["type"])


def run_setting(task: regime_benchmark.Task, regime: str, recipe: regime_benchmark.Recipe,
                refit_recipe: regime_benchmark.Recipe, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.cache_dir) / regime_benchmark.run_name(task, regime, recipe)
    train = lambda data, tag, r: finetune(task.new_model(seed), data, task.verified, run_dir / tag,  # noqa: E731
                                          r.epochs, r.lr, r.batch_size, seed)
    noisy_run, clean_run = train(task.noisy, f"noisy_s{seed}", recipe), train(task.clean, f"clean_s{seed}", recipe)
    labels = column_array(task.test, "labels")
    accuracy = lambda model: float(np.mean(predictions(model, task.test) == labels))  # noqa: E731
    final = load_checkpoint(task.model_class, noisy_run.final.path)
    early_stop = load_checkpoint(task.model_class, noisy_run.best)
    true_labels = column_array(task.clean, "labels")
    row: dict[str, Any] = {
        "task": task.name, "regime": regime, "seed": seed, "load": os.getloadavg()[0],
        "recipe": asdict(recipe), "refit_recipe": asdict(refit_recipe),
        "epoch_s": regime_benchmark.epoch_seconds(final, task.noisy, recipe),
        "noisy": accuracy(final), "clean": accuracy(load_checkpoint(task.model_class, clean_run.final.path)),
        "early_stop": accuracy(early_stop),
    }
    common = dict(task.repair_kwargs, repair_seed=seed, repair_disable_tqdm=True,
                  retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size)
    start = time.perf_counter()
    model = copy.deepcopy(final)
    result = Repairer(model, RepairConfig(method="auto", **common)).repair(
        task.verified, task.noisy, checkpoints=noisy_run.output_dir, initial_weights=task.new_model(seed).state_dict())
    row.update(auto=accuracy(model), auto_s=time.perf_counter() - start, auto_chosen=result.metrics.get("chosen"),
               auto_heldout=result.metrics.get("heldout_accuracy"))
    for base_name, base in (("final", final), ("early_stop", early_stop)):
        start = time.perf_counter()
        identification = Repairer(base, RepairConfig(method="erase", **common)).identify(task.noisy, task.verified)
        identify_s = time.perf_counter() - start
        summary = identification.summary
        row[f"identified_by_{base_name}"] = {k: summary.get(k) for k in ("num_flagged", "precision", "recall", "auroc")}
        for treatment, variant_base in VARIANTS:
            if variant_base != base_name:
                continue
            name = f"{treatment}_{base_name}"
            kept, kept_labels = training_labels(task, identification, treatment)
            # the cache key holds the training set, so a change in what is flagged trains again
            digest = hashlib.sha1(kept.tobytes() + kept_labels.tobytes()).hexdigest()[:10]
            refit_run = train(cleaned_training_set(task, kept, kept_labels), f"refit_{name}_s{seed}_{digest}",
                              refit_recipe)
            row[name] = accuracy(load_checkpoint(task.model_class, refit_run.final.path))
            row[f"{name}_s"] = identify_s + refit_run.train_seconds  # a cached run keeps its training time
            row[f"{name}_noise_left"] = float(np.mean(kept_labels != true_labels[kept]))
            print(f"  {task.name} {regime} seed {seed} {name}: test {row[name]:.4f}", flush=True)
    return row


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.0f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.0f}"


def summarize(rows: list[dict[str, Any]]) -> str:
    settings: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault((row["task"], row["regime"]), []).append(row)
    gap, versus, cost, ident = [], [], [], []
    for (task, regime), group in settings.items():
        head = [task, regime, len(group), f"{np.mean([r['noisy'] for r in group]) * 100:.2f}",
                f"{np.mean([r['clean'] for r in group]) * 100:.2f}"]
        gap.append(head + [mean_std([100 * gap_closed(r[c], r["noisy"], r["clean"]) for r in group]) for c in COLUMNS])
        cells = []
        for column in COLUMNS[1:]:
            differences = [100 * (r[column] - r["early_stop"]) for r in group]
            record = f"{sum(d > 0 for d in differences)}-{sum(d == 0 for d in differences)}-{sum(d < 0 for d in differences)}"
            cells.append(f"{np.mean(differences):+.2f} ({record})")
        versus.append([task, regime] + cells)
        cost.append([task, regime, f"{np.mean([r['epoch_s'] for r in group]):.1f}"]
                    + [f"{np.mean([r[f'{c}_s'] / r['epoch_s'] for r in group]):.2f}" for c in COLUMNS[1:]])
        for base in ("final", "early_stop"):
            stats = [r[f"identified_by_{base}"] for r in group]
            noise_left = [r[f"drop_{base}_noise_left"] for r in group]
            ident.append([task, regime, base] + [f"{np.mean([s[k] for s in stats]):.2f}" if k != "num_flagged" else
                                                 f"{np.mean([s[k] for s in stats]):.0f}"
                                                 for k in ("num_flagged", "precision", "recall", "auroc")]
                         + [f"{100 * np.mean(noise_left):.1f}"])
    labels = [LABELS[c] for c in COLUMNS]
    return "\n\n".join([
        "Gap closed on test in %, mean ± std over seeds:",
        markdown_table(["task", "regime", "seeds", "noisy %", "clean %"] + labels, gap),
        "Test accuracy minus early stopping's, in points, mean over seeds (seeds better-equal-worse):",
        markdown_table(["task", "regime"] + labels[1:], versus),
        "Cost after training, in noisy-training epochs (re-fine-tunes: identification + training):",
        markdown_table(["task", "regime", "one epoch s"] + labels[1:], cost),
        "Identification (library defaults) and the corrupted share left after dropping the flagged samples:",
        markdown_table(["task", "regime", "identified by", "flagged", "precision", "recall", "AUROC",
                        "noise left %"], ident),
    ])


def main() -> None:
    args = regime_benchmark.cached_runs_parser(__doc__).parse_args()
    regime_benchmark.run_cached_settings(
        args, lambda task, regime, recipes, seed, a: run_setting(task, regime, recipes[regime], recipes["short"], seed, a),
        summarize)

if __name__ == "__main__":
    main()
