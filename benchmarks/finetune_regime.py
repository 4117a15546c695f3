"""Fine-tuning regime: a pretrained backbone fine-tuned on noisy labels, hf_repair against the free baselines.

Users fine-tune pretrained models, which memorise little of their noise when fitted briefly and late
when fitted long. Before a repair is worth offering it must beat what the verified split gives for
free (method.md, "The fine-tuning regime"). Per task, regime and seed this script

1. fine-tunes a pretrained model with `transformers.Trainer` on a training set with symmetric label
   noise and, for the ceiling, on its clean labels, scoring every epoch on the verified split and
   keeping every epoch's checkpoint (cached in `--cache-dir`, so reruns skip training);
2. scores on the test set: the final noisy model; early stopping (the Trainer's best checkpoint by
   verified accuracy, what `load_best_model_at_end` gives); a uniform average of the 3 best
   checkpoints; the head refitted on the verified split (L2 softmax regression, L2 by 5-fold), on
   the final and on the early-stopped model; erase and every hf_repair method applied to the final
   model; and `method="auto"` (reads the checkpoints) where this hf_repair has it.

With `--lora` every fine-tune is a peft LoRA (rank 8, alpha 16, on every linear layer of the blocks, the
head trained whole as `modules_to_save`) at a higher learning rate (`LORA`); checkpoints are adapters,
loaded onto a fresh base, and the tasks are reported as "vision+lora" / "text+lora", with one more column:
the projection applied to the merged weights (`merge_and_unload()`) instead of the adapter's `A <- A M`.

Tasks: "vision", a small ViT (hidden 64, 4 layers, patch 7) pretrained here on clean Fashion-MNIST
classes 0-4 and fully fine-tuned (new head) on classes 5-9; "text", the pretrained MiniLM-L6 on
Rotten Tomatoes. Regimes: "short" (barely memorises) and "long" (memorises). Tables report the gap
closed, (method - noisy) / (clean - noisy) on test, as mean ± std over seeds, per-seed wins against
early stopping, costs in training epochs, and the raw per-seed test accuracies.

    python benchmarks/finetune_regime.py                          # everything (hours on a busy 2-core box)
    python benchmarks/finetune_regime.py --tasks vision --seeds 0  # one task, one seed
    python benchmarks/finetune_regime.py --quick                  # smoke test, a few minutes
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, PreTrainedModel, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

import hf_repair.config
from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from testbed.experiments import train_classifier
from testbed.finetuning import (
    Trajectory,
    average_checkpoints,
    fashion_mnist_classes,
    finetune,
    load_checkpoint,
    new_vit_classifier,
    predictions,
    pretrained_vit,
    refit_head,
)
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_rotten_tomatoes, minilm_path

from common import gap_closed, markdown_table

BASELINES = ("early_stop", "average3", "head_refit", "early_stop+head_refit")
REPAIRS = ("erase", "projection", "retention", "projection+retention")
HAS_AUTO = "auto" in hf_repair.config.METHODS  # the trajectory-reading default, once it lands
METHODS = BASELINES + REPAIRS + (("auto",) if HAS_AUTO else ()) + ("projection_merged",)  # the last: --lora only
LABELS = {"early_stop": "early stop", "average3": "avg best-3 ckpts", "head_refit": "head refit",
          "early_stop+head_refit": "early stop + head refit", "projection_merged": "projection of merged weights"}


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int

    def key(self) -> str:
        return f"e{self.epochs}_lr{self.lr:g}_bs{self.batch_size}"


@dataclass(frozen=True)
class Sizes:
    train: int
    verified: int
    test: int | None  # None: the whole test split
    regimes: dict[str, Recipe] = field(hash=False)


# "short" barely memorises the noise, "long" memorises it (more epochs and a higher learning rate).
FULL = {
    "vision": Sizes(train=5000, verified=500, test=None,
                    regimes={"short": Recipe(10, 5e-4, 64), "long": Recipe(40, 2e-3, 64)}),
    "text": Sizes(train=1000, verified=300, test=1000,
                  regimes={"short": Recipe(2, 5e-5, 16), "long": Recipe(6, 1e-4, 16)}),
}
QUICK = {
    "vision": Sizes(train=300, verified=60, test=500, regimes={"short": Recipe(2, 5e-4, 64), "long": Recipe(3, 2e-3, 64)}),
    "text": Sizes(train=48, verified=30, test=48, regimes={"short": Recipe(1, 5e-5, 16), "long": Recipe(2, 1e-4, 16)}),
}
# LoRA trains fewer weights from a zero update: the same epochs at a higher learning rate (the ViT's LoRA
# diverged at 1e-2; at 3e-3 for 40 epochs it memorises, benchmarks/lora_projection.py).
LORA = {"vision": {"short": Recipe(10, 1e-3, 64), "long": Recipe(40, 3e-3, 64)},
        "text": {"short": Recipe(2, 5e-4, 16), "long": Recipe(6, 1e-3, 16)}}
LORA_TARGETS = {"vision": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
                "text": ["query", "key", "value", "dense"]}
PRETRAIN = {"epochs": 15, "num_images": None}  # the ViT backbone: all 30,000 clean images of classes 0-4
QUICK_PRETRAIN = {"epochs": 1, "num_images": 2000}
SOURCE_CLASSES, TARGET_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


@dataclass
class Task:
    """One seed's data for a task, how to build its model, and the hf_repair settings that fit it."""

    name: str
    noisy: datasets.Dataset
    clean: datasets.Dataset
    verified: datasets.Dataset
    test: datasets.Dataset
    model_class: Any  # loads a checkpoint folder: a model class, or `LoraCheckpoints`
    new_model: Callable[[int], PreTrainedModel]
    repair_kwargs: dict[str, Any]
    key: str  # cache key of the data and backbone settings
    head: str = "classifier"  # the head the baseline refit replaces


@dataclass
class LoraCheckpoints:
    """Loads a LoRA run's checkpoint (an adapter) onto a fresh base, as a model class loads a full checkpoint."""

    new_base: Callable[[], PreTrainedModel]

    def from_pretrained(self, path: str | os.PathLike) -> torch.nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(self.new_base(), str(path), is_trainable=True)  # the fine-tunes train it


def with_lora(task: Task, seed: int) -> Task:
    """The task with every fine-tune a LoRA of the same backbone (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[task.name], modules_to_save=["classifier"])
    return replace(task, name=f"{task.name}+lora", model_class=LoraCheckpoints(lambda: task.new_model(seed)),
                   new_model=lambda s: get_peft_model(task.new_model(s), config), key=f"{task.key}_lora8",
                   head="base_model.model.classifier.modules_to_save.default")


def vision_task(seed: int, sizes: Sizes, args: argparse.Namespace) -> Task:
    pretrain = QUICK_PRETRAIN if args.quick else PRETRAIN
    backbone = pretrained_vit(args.cache_dir, classes=SOURCE_CLASSES, **pretrain)
    pool, test = fashion_mnist_classes("train", TARGET_CLASSES), fashion_mnist_classes("test", TARGET_CLASSES)
    order = np.random.default_rng(seed).permutation(len(pool))
    clean = pool.select(order[:sizes.train])
    verified = pool.select(order[sizes.train:sizes.train + sizes.verified])
    if sizes.test is not None:
        test = test.select(np.random.default_rng(0).permutation(len(test))[:sizes.test])
    names = pool.features["labels"].names
    return Task(name="vision", noisy=corrupt_dataset(clean, "symmetric", args.noise, seed=seed), clean=clean,
                verified=verified, test=test, model_class=ViTForImageClassification,
                new_model=lambda s: new_vit_classifier(backbone, names, s),
                repair_kwargs=dict(target_modules="all", batch_size=128),
                key=f"vision_{backbone.name}_n{sizes.train}_v{sizes.verified}_noise{args.noise}")


def text_reviews(seed: int, sizes: Sizes) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Rotten Tomatoes split into the fixed test set and, shuffled per seed, the pool the task takes its reviews from."""
    reviews = load_rotten_tomatoes().train_test_split(test_size=sizes.test, seed=0)
    return reviews["train"].shuffle(seed=seed), reviews["test"]


@functools.cache
def minilm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """MiniLM's tokenizer, loaded once for every part a script encodes."""
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def encode_reviews(part: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """MiniLM's token ids for `part`, padded to `max_length`."""
    tokenizer = minilm_tokenizer()
    tokens = part.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding="max_length"),
                      batched=True)
    return tokens.remove_columns("text").with_format("torch")


def text_task(seed: int, sizes: Sizes, args: argparse.Namespace) -> Task:
    """MiniLM on Rotten Tomatoes: a fixed test set, and per seed a training set and a disjoint verified split."""
    pool, test = text_reviews(seed, sizes)
    encode = functools.partial(encode_reviews, max_length=args.max_length)
    clean = encode(pool.select(range(sizes.train)))
    verified = encode(pool.select(range(sizes.train, sizes.train + sizes.verified)))

    def new_model(s: int) -> PreTrainedModel:
        transformers.set_seed(s)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    return Task(name="text", noisy=corrupt_dataset(clean, "symmetric", args.noise, seed=seed), clean=clean,
                verified=verified, test=encode(test), model_class=AutoModelForSequenceClassification,
                new_model=new_model, repair_kwargs=dict(target_modules="all-linear", batch_size=32),
                key=f"text_minilm_n{sizes.train}_v{sizes.verified}_len{args.max_length}_noise{args.noise}")


TASKS: dict[str, Callable[[int, Sizes, argparse.Namespace], Task]] = {"vision": vision_task, "text": text_task}


def epoch_seconds(model: torch.nn.Module, train: datasets.Dataset, recipe: Recipe, steps: int = 10) -> float:
    """One training epoch's wall time, extrapolated from `steps` optimizer steps on a copy timed now.

    Timed under the same machine load as the repairs, so the costs in epochs are comparable ratios.
    """
    steps = min(steps, math.ceil(len(train) / recipe.batch_size))
    subset = train.select(range(min(len(train), steps * recipe.batch_size)))
    start = time.perf_counter()
    train_classifier(copy.deepcopy(model), subset, epochs=1, batch_size=recipe.batch_size, lr=recipe.lr, progress=False)
    return (time.perf_counter() - start) * len(train) / len(subset)


def run_name(task: Task, regime: str, recipe: Recipe) -> str:
    """Where a setting's trajectories are cached, relative to --cache-dir; also names the setting in --json rows."""
    return f"{task.key}/{regime}_{recipe.key()}"


def run_setting(task: Task, regime: str, recipe: Recipe, seed: int, args: argparse.Namespace,
                methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Train (or reuse) the noisy and clean trajectories of one seed, then score `methods` (and early stopping) on test."""
    run_dir = Path(args.cache_dir) / run_name(task, regime, recipe)
    train = lambda data, tag: finetune(task.new_model(seed), data, task.verified, run_dir / f"{tag}_s{seed}",  # noqa: E731
                                       recipe.epochs, recipe.lr, recipe.batch_size, seed)
    noisy_run, clean_run = train(task.noisy, "noisy"), train(task.clean, "clean")
    labels = column_array(task.test, "labels")
    final = load_checkpoint(task.model_class, noisy_run.final.path)
    corrupted = np.flatnonzero(column_array(task.noisy, "is_corrupted"))
    row: dict[str, Any] = {
        "task": task.name, "regime": regime, "seed": seed, "recipe": asdict(recipe), "load": os.getloadavg()[0],
        "run": run_name(task, regime, recipe),
        "epoch_s": epoch_seconds(final, task.noisy, recipe),
        "noisy": float(np.mean(predictions(final, task.test) == labels)),
        "clean": float(np.mean(predictions(load_checkpoint(task.model_class, clean_run.final.path), task.test) == labels)),
        # share of the corrupted training samples whose wrong label the final model predicts
        "memorised": float(np.mean(predictions(final, task.noisy.select(corrupted))
                                   == column_array(task.noisy, "labels")[corrupted])),
        "num_corrupted": len(corrupted),
        "verified_curve": [c.verified_accuracy for c in noisy_run.checkpoints],
        "clean_verified_curve": [c.verified_accuracy for c in clean_run.checkpoints],
        "best_epoch": noisy_run.best_checkpoint.epoch,
    }
    reference = None  # early stopping's per-sample correctness, for the paired comparisons

    def score(method: str, build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]]) -> None:
        nonlocal reference
        start = time.perf_counter()
        model, extra = build()
        seconds = time.perf_counter() - start + extra.pop("extra_s", 0.0)
        correct = predictions(model, task.test) == labels
        if method == "early_stop":
            reference = correct
        difference = correct.astype(float) - reference
        row[method] = float(correct.mean())
        row[f"{method}_s"] = seconds
        row[f"{method}_vs_es_se"] = float(difference.std(ddof=1) / math.sqrt(len(difference)))
        row.update({f"{method}_{k}": v for k, v in extra.items()})
        print(f"  {task.name} {regime} seed {seed} {method}: test {row[method]:.4f} ({seconds:.1f}s) {extra or ''}",
              flush=True)

    def refit(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
        return model, {"l2": refit_head(model, task.verified, head=task.head, seed=seed).l2}

    score("early_stop", lambda: (load_checkpoint(task.model_class, noisy_run.best), {}))  # the reference, always
    if "average3" in methods:
        score("average3", lambda: (average_checkpoints(task.model_class, [c.path for c in noisy_run.top(3)]),
                                   {"epochs": [c.epoch for c in noisy_run.top(3)]}))
    if "head_refit" in methods:
        score("head_refit", lambda: refit(load_checkpoint(task.model_class, noisy_run.final.path)))
    if "early_stop+head_refit" in methods:
        score("early_stop+head_refit", lambda: refit(load_checkpoint(task.model_class, noisy_run.best)))
    # As RepairCallback does: fine-tune with the Trainer's learning rate and batch size.
    common = dict(task.repair_kwargs, repair_seed=seed, repair_disable_tqdm=True,
                  retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size)
    auto_options = dict(getattr(args, "auto_option", None) or [])
    if auto_options:
        row["auto_options"] = auto_options
    if not set(REPAIRS) & set(methods):
        return _with_auto(row, methods, score, final, task, {**common, **auto_options}, noisy_run.output_dir)

    start = time.perf_counter()
    identification = Repairer(final, RepairConfig(method="erase", **common)).identify(task.noisy, task.verified)
    identify_s = time.perf_counter() - start
    summary = identification.summary
    row.update(identify_s=identify_s, **{k: summary.get(k) for k in ("num_flagged", "precision", "recall", "auroc")})

    def repair(method: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        model = copy.deepcopy(final)
        fine_tunes = method != "projection"
        result = Repairer(model, RepairConfig(method=method, **common)).repair(
            task.verified, train_dataset=task.noisy if fine_tunes else None,
            identification=identification if fine_tunes else None)
        return model, {"adopted": result.adopted, "extra_s": identify_s if fine_tunes else 0.0}

    for method in REPAIRS:
        if method in methods:
            score(method, functools.partial(repair, method))
    # --lora: the alternative to A <- A M, the projection of the merged weights
    if isinstance(task.model_class, LoraCheckpoints) and "projection_merged" in methods:
        def merged_projection() -> tuple[torch.nn.Module, dict[str, Any]]:
            model = copy.deepcopy(final).merge_and_unload()
            result = Repairer(model, RepairConfig(method="projection", **common)).repair(task.verified)
            return model, {"adopted": result.adopted}

        score("projection_merged", merged_projection)
    return _with_auto(row, methods, score, final, task, {**common, **auto_options}, noisy_run.output_dir)


def _with_auto(row: dict[str, Any], methods: tuple[str, ...], score: Callable, final: torch.nn.Module, task: Task,
               common: dict[str, Any], checkpoints: str) -> dict[str, Any]:
    """Score method "auto" (if asked for), the same call `RepairCallback` makes at train end, on the final model."""
    if "auto" in methods:
        def auto() -> tuple[torch.nn.Module, dict[str, Any]]:
            model = copy.deepcopy(final)
            # the weights training started from (new_model is seeded), which RepairCallback keeps for "retrain"
            result = Repairer(model, RepairConfig(method="auto", **common)).repair(
                task.verified, task.noisy, checkpoints=checkpoints, initial_weights=task.new_model(row["seed"]).state_dict())
            return model, {"adopted": result.adopted, "chosen": result.metrics.get("chosen"),
                           "p_value": result.metrics.get("p_value")}

        score("auto", auto)
    return row


def auto_option(text: str) -> tuple[str, Any]:
    """--auto-option KEY=VALUE: the value as JSON where it parses (numbers, lists), else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def rescored(kept: dict[str, Any], new: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """`kept` with `methods` replaced by their new scores; their seconds are rescaled to `kept`'s epoch time,
    since the new ones were timed next to an epoch timed at the new load."""
    row = dict(kept, rescored=methods, rescore_load=new["load"])
    for method in methods:
        row.update({key: value for key, value in new.items() if key == method or key.startswith(f"{method}_")})
        row[f"{method}_s"] = new[f"{method}_s"] * kept["epoch_s"] / new["epoch_s"]
    return row


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' of the defined values; 'n/a' marks how many seeds had none (no gap to close)."""
    defined = [scale * v for v in values if v is not None]
    text = f"{np.mean(defined):.{digits}f} ± {np.std(defined):.{digits}f}" if defined else "n/a"
    return text + (f" ({len(values) - len(defined)} n/a)" if len(defined) < len(values) else "")


def summarize(rows: list[dict[str, Any]]) -> str:
    methods = [m for m in METHODS if all(m in r for r in rows)]
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["regime"]), []).append(r)
    keys = sorted(groups, key=lambda k: (not k[0].startswith("vision"), k[0], k[1] != "short"))
    recipe = lambda k: Recipe(**groups[k][0]["recipe"]).key()  # noqa: E731

    gaps, wins, costs, raw, found = [], [], [], [], []
    for key in keys:
        group = groups[key]
        percent = [mean_std([r[name] for r in group], 100) for name in ("memorised", "noisy", "clean")]
        gaps.append([*key, recipe(key), len(group), percent[0], mean_std([r["best_epoch"] for r in group], 1, 1),
                     *percent[1:]]
                    + [mean_std([gap_closed(r[m], r["noisy"], r["clean"]) for r in group], 100, 0) for m in methods])
        line = [*key]
        for m in methods[1:]:
            diffs = [100 * (r[m] - r["early_stop"]) for r in group]
            half = 1.96 * 100 * math.sqrt(sum(r[f"{m}_vs_es_se"] ** 2 for r in group)) / len(group)
            record = f"{sum(d > 0 for d in diffs)}-{sum(d == 0 for d in diffs)}-{sum(d < 0 for d in diffs)}"
            line.append(f"{np.mean(diffs):+.2f} ± {np.std(diffs):.2f} ({record}) [±{half:.2f}]")
        wins.append(line)
        found.append([*key, mean_std([r.get("num_flagged") for r in group], 1, 0)]  # None: --methods scored no repair
                     + [mean_std([r.get(k) for r in group], 1) for k in ("precision", "recall", "auroc")])
        costs.append([*key, f"{np.mean([r['epoch_s'] for r in group]):.1f}"]
                     + [f"{np.mean([r[f'{m}_s'] / r['epoch_s'] for r in group]):.2f}" for m in methods])
        for r in sorted(group, key=lambda r: r["seed"]):
            load = f"{r.get('load', math.nan):.1f}" + (f" / {r['load_end']:.1f}" if "load_end" in r else "")
            raw.append([*key, r["seed"], load, f"{100 * r['memorised']:.1f}", f"{100 * r['noisy']:.2f}",
                        f"{100 * r['clean']:.2f}"]
                       + [f"{100 * r[m]:.2f}" + (f" (ep {r['best_epoch']})" if m == "early_stop" else "")
                          + ("" if r.get(f"{m}_adopted", True) else " n/a") for m in methods])
    names = [LABELS.get(m, m) for m in methods]
    parts = [
        "Gap closed on test in %, 100 (method - noisy) / (clean - noisy), mean ± std over seeds; accuracies in %:",
        markdown_table(["task", "regime", "recipe", "seeds", "noise memorised %", "best epoch", "noisy %", "clean %"]
                       + names, gaps),
        "Test accuracy minus early stopping's, in points: mean ± std over seeds (seeds better-equal-worse) "
        "[95% interval of the mean from the paired per-sample test differences, test sampling only]:",
        markdown_table(["task", "regime"] + names[1:], wins),
        "hf_repair's identification (library defaults) on the final noisy model, shared by erase and the retention "
        "methods: training samples flagged, and precision, recall and AUROC against the known corruption "
        "(flagged / corrupted = recall / precision), mean ± std over seeds:",
        markdown_table(["task", "regime", "flagged", "precision", "recall", "AUROC"], found),
        "Cost: wall time of the post-training step (loading checkpoints, refits, identification + repair) in "
        "training epochs of the noisy model, one epoch timed at scoring time; early stopping and averaging "
        "also need the per-epoch verified evaluation and checkpoints during training:",
        markdown_table(["task", "regime", "one epoch s"] + names, costs),
        "Per-seed test accuracy %, early stopping's epoch in brackets; 'n/a': hf_repair did not adopt its repair "
        "(model unchanged); load: the machine's 1-minute load average when scoring began / its 15-minute "
        "average when scoring ended:",
        markdown_table(["task", "regime", "seed", "load", "memorised", "noisy", "clean"] + names, raw),
    ]
    return "\n\n".join(parts)


CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hf_repair_benchmarks", "finetune_regime")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--noise, --cache-dir and --threads: which cached trajectories a script reads, and with how many threads."""
    parser.add_argument("--noise", type=float, default=0.4, help="Symmetric noise rate.")
    parser.add_argument("--cache-dir", default=CACHE_DIR, help="Where the trajectories are cached.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box).")


def add_run_arguments(parser: argparse.ArgumentParser, task: str = "vision") -> None:
    """--task, --regime, --seed, --max-length and the cache arguments: the one cached noisy run a script studies."""
    parser.add_argument("--task", default=task, choices=list(TASKS))
    parser.add_argument("--regime", default="short", choices=["short", "long"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=48, help="Tokens per text (padded), as the cached text runs.")
    add_cache_arguments(parser)


@dataclass
class NoisyRun:
    """One seed's noisy fine-tune and what built it, where the scripts that study `auto`'s parts start."""

    task: Task
    recipe: Recipe
    run_dir: Path  # the setting's cache folder: every seed's noisy, clean and fresh runs
    trajectory: Trajectory


def noisy_run(args: argparse.Namespace, lora: bool = False) -> NoisyRun:
    """The run `add_run_arguments` names (`lora`: its LoRA fine-tune), trained now unless this script cached it."""
    sizes = FULL[args.task]
    task, recipes = TASKS[args.task](args.seed, sizes, args), sizes.regimes
    if lora:
        task, recipes = with_lora(task, args.seed), LORA[args.task]
    recipe = recipes[args.regime]
    run_dir = Path(args.cache_dir) / run_name(task, args.regime, recipe)
    trajectory = finetune(task.new_model(args.seed), task.noisy, task.verified, run_dir / f"noisy_s{args.seed}",
                          recipe.epochs, recipe.lr, recipe.batch_size, args.seed)
    return NoisyRun(task, recipe, run_dir, trajectory)


def quiet_scoring(args: argparse.Namespace, level: int = logging.WARNING) -> None:
    """Full sizes, fixed torch threads and quiet libraries: how every script over the cached trajectories runs."""
    args.quick = False
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=level)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def cached_runs_parser(description: str) -> argparse.ArgumentParser:
    """The options of the scripts that score more methods on this benchmark's cached trajectories."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["vision"], choices=["vision", "text"])
    parser.add_argument("--regimes", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lora", action="store_true", help="LoRA fine-tunes, as finetune_regime.py --lora.")
    parser.add_argument("--max-length", type=int, default=48, help="Tokens per text (padded).")
    add_cache_arguments(parser)
    parser.add_argument("--json", default=None, help="Write every per-seed row to this file (after each setting).")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON", help="Print the tables of saved rows.")
    return parser


def run_cached_settings(args: argparse.Namespace, run: Callable[..., dict[str, Any]],
                        summarize_rows: Callable[[list[dict[str, Any]]], str]) -> None:
    """`run(task, regime, recipes, seed, args)` for every task, seed and regime of `args` (or --summarize saved rows)."""
    if args.summarize:
        print(summarize_rows([row for path in args.summarize for row in json.loads(Path(path).read_text())]))
        return
    quiet_scoring(args)
    rows = []
    for name in args.tasks:
        sizes = FULL[name]
        for seed in args.seeds:
            task = TASKS[name](seed, sizes, args)
            recipes = LORA[name] if args.lora else sizes.regimes
            if args.lora:
                task = with_lora(task, seed)
            for regime in args.regimes:
                rows.append(run(task, regime, recipes, seed, args))
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(summarize_rows(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--regimes", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Default 0 1 2 (--quick: 0 1).")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and epochs: checks the script runs.")
    parser.add_argument("--vision-train", type=int, default=None, help=f"Default {FULL['vision'].train}.")
    parser.add_argument("--vision-verified", type=int, default=None, help=f"Default {FULL['vision'].verified}.")
    parser.add_argument("--vision-test", type=int, default=None, help="Default: the 5,000 test images of classes 5-9.")
    parser.add_argument("--text-train", type=int, default=None, help=f"Default {FULL['text'].train}.")
    parser.add_argument("--text-verified", type=int, default=None, help=f"Default {FULL['text'].verified}.")
    parser.add_argument("--text-test", type=int, default=None, help=f"Default {FULL['text'].test}.")
    parser.add_argument("--max-length", type=int, default=48, help="Tokens per text (padded).")
    parser.add_argument("--noise", type=float, default=0.4, help="Symmetric noise rate.")
    parser.add_argument("--lora", action="store_true", help="Fine-tune with peft LoRA (rank 8) instead of fully.")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                        help="Score only these (early stopping, the reference, always); default: every method.")
    parser.add_argument("--auto-option", action="append", type=auto_option, metavar="KEY=VALUE",
                        help="A RepairConfig option of method 'auto' only, e.g. fresh_objective=contrastive "
                             "(repeatable; the value is read as JSON where it parses, else as a string).")
    parser.add_argument("--cache-dir", default=CACHE_DIR)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box).")
    parser.add_argument("--json", default=None, help="Write every per-seed row to this file (after each setting).")
    parser.add_argument("--resume", action="store_true",
                        help="Keep the rows already in --json that match a setting (data, recipe, seed) of this run, "
                        "and score only the others: continues an interrupted run.")
    parser.add_argument("--rescore", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                        help="With --resume: score these methods again on the kept rows (training and the other "
                        "columns are reused), e.g. after a change to hf_repair's auto.")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="Print the tables of rows saved by earlier --json runs (merged) instead of running.")
    args = parser.parse_args()
    if args.summarize:
        print(summarize([row for path in args.summarize for row in json.loads(Path(path).read_text())]))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    overrides = {"vision": (args.vision_train, args.vision_verified, args.vision_test),
                 "text": (args.text_train, args.text_verified, args.text_test)}

    done = {}
    if args.resume and args.json and Path(args.json).exists():
        done = {(r["run"], r["seed"]): r for r in json.loads(Path(args.json).read_text()) if "run" in r}
    rows = []
    for name in args.tasks:
        sizes = (QUICK if args.quick else FULL)[name]
        train_n, verified_n, test_n = overrides[name]
        sizes = replace(sizes, train=train_n or sizes.train, verified=verified_n or sizes.verified,
                        test=test_n or sizes.test)
        for seed in seeds:
            task = TASKS[name](seed, sizes, args)
            if args.lora:
                task = with_lora(task, seed)
            for regime in args.regimes:
                recipe = LORA[name][regime] if args.lora and not args.quick else sizes.regimes[regime]
                kept = done.get((run_name(task, regime, recipe), seed))
                if kept is not None and args.rescore:
                    kept = rescored(kept, run_setting(task, regime, recipe, seed, args, tuple(args.rescore)),
                                    args.rescore)
                if kept is None:
                    kept = run_setting(task, regime, recipe, seed, args, tuple(args.methods or METHODS))
                    # "load" is a 1-minute sample taken before scoring; a neighbour started later shows only here
                    kept["load_end"] = os.getloadavg()[2]
                rows.append(kept)
                if args.json:  # after every setting, so an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(f"{args.noise:.0%} symmetric noise; hf_repair method 'auto' {'included' if HAS_AUTO else 'not in this version'}.")
    print(summarize(rows))


if __name__ == "__main__":
    main()
