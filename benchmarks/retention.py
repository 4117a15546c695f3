"""Beneficial retention vs. erase vs. projection on Fashion-MNIST (CNN, small ViT) and MiniLM text.

For each architecture, noise setting and seed: train the model on noisy labels until it memorises
them, and on clean labels (the ceiling); identify harmful samples once with the verified split,
flagging `--flag_multiplier` times as many samples as are corrupted (2 = imprecise identification:
at least half the flagged samples are clean); then repair copies of the noisy model with
projection, erase, retention and projection+retention. Reports test accuracy, the share of the
gap to the clean-trained model closed, and wall time (identification + repair) in units of one
training epoch of the same model on the same data. Trained models are cached in `--cache_dir`.

    python benchmarks/retention.py                                  # everything (tens of minutes on 2 cores)
    python benchmarks/retention.py --archs cnn --noises sym40 --seeds 1   # one row, a few minutes
    python benchmarks/retention.py --archs text                     # the MiniLM / Rotten Tomatoes task only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from testbed.experiments import SmallCNN, evaluate_accuracy, small_vit, train_classifier
from testbed.noise import FASHION_MNIST_CONFUSABLE_PAIRS, corrupt_dataset
from testbed.offline_data import load_fashion_mnist, load_rotten_tomatoes, minilm_path

from common import gap_closed, markdown_table

NOISES = {"sym25": ("symmetric", 0.25), "sym40": ("symmetric", 0.4), "asym20": ("asymmetric", 0.2)}
METHODS = ("projection", "erase", "retention", "projection+erase", "projection+retention")
# Training recipes: long enough that the noisy model memorises its labels (the usual label-noise setting).
RECIPES = {
    "cnn": dict(epochs=40, lr=1e-3, batch_size=128),
    "vit": dict(epochs=30, lr=1e-3, batch_size=128),
    "text": dict(epochs=4, lr=5e-5, batch_size=32),
}


def build(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "cnn":
        return SmallCNN()
    if arch == "vit":
        return small_vit()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def trained(arch: str, dataset, tag: str, seed: int, cache_dir: str) -> tuple[torch.nn.Module, float]:
    """The model trained on `dataset` (cached), and the wall time of one of its training epochs."""
    recipe = RECIPES[arch]
    path = os.path.join(cache_dir, f"{arch}_{tag}_n{len(dataset)}_e{recipe['epochs']}_s{seed}.pt")
    model = build(arch, seed)
    if os.path.exists(path):
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["epoch_s"]
    start = time.perf_counter()
    train_classifier(model, dataset, seed=seed, progress=False, **recipe)
    epoch_s = (time.perf_counter() - start) / recipe["epochs"]
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"state": model.state_dict(), "epoch_s": epoch_s}, path)
    return model.eval(), epoch_s


def one_epoch_seconds(arch: str, model: torch.nn.Module, dataset, seed: int) -> float:
    """Time one training epoch of a copy now, so costs are ratios taken under the same machine load."""
    recipe = dict(RECIPES[arch], epochs=1)
    start = time.perf_counter()
    train_classifier(copy.deepcopy(model), dataset, seed=seed, progress=False, **recipe)
    return time.perf_counter() - start


def image_data(seed: int, noise: str, num_train: int, args: argparse.Namespace):
    full = load_fashion_mnist("train")
    order = np.random.default_rng(seed).permutation(len(full))
    clean = full.select(order[:num_train])
    verified = full.select(order[num_train : num_train + args.num_verified])
    kind, rate = NOISES[noise]
    extra = {"pairs": FASHION_MNIST_CONFUSABLE_PAIRS} if kind == "asymmetric" else {}
    return clean, corrupt_dataset(clean, kind, rate, seed=seed, **extra), verified, load_fashion_mnist("test")


def text_data(seed: int, args: argparse.Namespace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    reviews = load_rotten_tomatoes().shuffle(seed=seed)
    encode = lambda batch: tokenizer(batch["text"], truncation=True, max_length=64, padding="max_length")  # noqa: E731
    n_train, n_ver, n_test = args.text_train, args.text_verified, args.text_test
    parts = [reviews.select(range(a, b)) for a, b in
             ((0, n_train), (n_train, n_train + n_ver), (n_train + n_ver, n_train + n_ver + n_test))]
    clean, verified, test = (p.map(encode, batched=True).remove_columns("text").with_format("torch") for p in parts)
    noisy = corrupt_dataset(clean, "symmetric", args.text_noise, seed=seed)
    return clean, noisy, verified, test


def run_setting(arch: str, noise: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    if arch == "text":
        clean_data, noisy_data, verified, test = text_data(seed, args)
        base = dict(target_modules="all-linear", batch_size=32, retention_learning_rate=args.text_lr)
    else:
        clean_data, noisy_data, verified, test = image_data(
            seed, noise, args.vit_num_train if arch == "vit" and args.vit_num_train else args.num_train, args)
        base = dict(target_modules="all", batch_size=128, retention_learning_rate=args.lr)
    noisy_model, _ = trained(arch, noisy_data, noise, seed, args.cache_dir)
    clean_model, _ = trained(arch, clean_data, "clean", seed, args.cache_dir)
    epoch_s = one_epoch_seconds(arch, noisy_model, noisy_data, seed)
    corrupted = float(np.mean(column_array(noisy_data, "is_corrupted")))
    flag_fraction = min(1.0, args.flag_multiplier * corrupted)
    common = dict(base, repair_seed=seed, repair_disable_tqdm=True, score=args.score, separation=args.separation,
                  flag_rule="budget", flag_fraction=flag_fraction, retention_epochs=args.retention_epochs)
    row: dict[str, Any] = {"arch": arch, "noise": noise, "seed": seed, "epoch_s": epoch_s,
                           "noisy": evaluate_accuracy(noisy_model, test, batch_size=64),
                           "clean": evaluate_accuracy(clean_model, test, batch_size=64)}
    start = time.perf_counter()
    identification = Repairer(noisy_model, RepairConfig(**common)).identify(noisy_data, verified)
    identify_s = time.perf_counter() - start
    print(f"  {arch} {noise} seed {seed}: noisy {row['noisy']:.4f}, clean {row['clean']:.4f}, one epoch {epoch_s:.1f}s",
          flush=True)
    row.update(identify_s=identify_s, precision=identification.summary.get("precision"),
               recall=identification.summary.get("recall"), auroc=identification.summary.get("auroc"))
    for method in args.methods:
        model = copy.deepcopy(noisy_model)
        start = time.perf_counter()
        result = Repairer(model, RepairConfig(method=method, **common)).repair(
            verified, train_dataset=noisy_data, identification=identification)
        seconds = time.perf_counter() - start + (identify_s if method != "projection" else 0.0)
        row[method] = evaluate_accuracy(model, test, batch_size=64)
        row[f"{method}_epochs"] = seconds / epoch_s
        row[f"{method}_adopted"] = result.adopted
        row[f"{method}_heldout"] = (result.metrics["accuracy_before"], result.metrics["accuracy_after"])
        print(f"  {arch} {noise} seed {seed} {method}: test {row[method]:.4f} "
              f"({seconds:.0f}s = {row[f'{method}_epochs']:.2f} epochs), {result.metrics.get('stages')}", flush=True)
    return row


def summarize(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> str:
    table = []
    for key in sorted({(r["arch"], r["noise"]) for r in rows}, key=lambda k: (k[0], k[1])):
        group = [r for r in rows if (r["arch"], r["noise"]) == key]
        mean = lambda name, group=group: float(np.mean([r[name] for r in group]))  # noqa: E731
        std = lambda name, group=group: float(np.std([r[name] for r in group]))  # noqa: E731
        line = [key[0], key[1], len(group), f"{100 * mean('noisy'):.2f}", f"{100 * mean('clean'):.2f}"]
        for method in methods:
            gaps = [gap_closed(r[method], r["noisy"], r["clean"]) for r in group]
            line.append(f"{100 * mean(method):.2f} ± {100 * std(method):.2f} ({np.mean(gaps):.0%}, "
                        f"{mean(method + '_epochs'):.2f} ep)")
        pairs = [pair for pair in WIN_PAIRS if set(pair) <= set(methods)]
        line.extend(sum(r[better] > r[worse] for r in group) for better, worse in pairs)
        table.append(line)
    pairs = [pair for pair in WIN_PAIRS if set(pair) <= set(methods)]
    header = ["model", "noise", "seeds", "noisy %", "clean %"] + [f"{m} % (gap closed, cost)" for m in methods] + [
        f"seeds {better} > {worse}" for better, worse in pairs]
    return markdown_table(header, table)


# Retention against erase from the same starting point, and the recommended method against plain erase.
WIN_PAIRS = [("retention", "erase"), ("projection+retention", "projection+erase"), ("projection+retention", "erase")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["cnn", "vit", "text"], choices=["cnn", "vit", "text"])
    parser.add_argument("--noises", nargs="+", default=list(NOISES), choices=list(NOISES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--vit_seeds", type=int, default=None, help="Seeds for the ViT (default: --seeds).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--num_train", type=int, default=8000)
    parser.add_argument("--vit_num_train", type=int, default=None, help="Training samples for the ViT (default: --num_train).")
    parser.add_argument("--num_verified", type=int, default=500)
    parser.add_argument("--flag_multiplier", type=float, default=2.0,
                        help="Flag this many times as many samples as are corrupted (2: half the flagged are clean).")
    parser.add_argument("--retention_epochs", type=float, default=1.0, help="Fine-tune budget in training epochs.")
    parser.add_argument("--score", default="auto", help="Identification score (RepairConfig.score).")
    parser.add_argument("--separation", default="belief", help="RepairConfig.separation of the retention methods.")
    parser.add_argument("--lr", type=float, default=5e-4, help="Fine-tune learning rate of the image models.")
    parser.add_argument("--text_lr", type=float, default=5e-5, help="Fine-tune learning rate of MiniLM.")
    parser.add_argument("--text_train", type=int, default=2000)
    parser.add_argument("--text_verified", type=int, default=300)
    parser.add_argument("--text_test", type=int, default=1000)
    parser.add_argument("--text_noise", type=float, default=0.3, help="Symmetric noise rate of the binary text task.")
    parser.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_repair_bench"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box).")
    parser.add_argument("--json", default=None, help="Also write every per-seed row to this file.")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="Print the table of rows saved by earlier --json runs (merged) instead of running.")
    args = parser.parse_args()
    if args.summarize:
        rows = [row for path in args.summarize for row in json.load(open(path))]
        print(summarize(rows, tuple(m for m in args.methods if all(m in r for r in rows))))
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows = []
    for arch in args.archs:
        noises = ["sym30"] if arch == "text" else args.noises
        seeds = args.vit_seeds if arch == "vit" and args.vit_seeds is not None else args.seeds
        for noise in noises:
            for seed in range(seeds):
                rows.append(run_setting(arch, noise, seed, args))
                if args.json:  # after every setting, so an interrupted run keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    print()
    print(f"Score {args.score!r}, flagged {args.flag_multiplier}x the corrupted count; fine-tune budget "
          f"{args.retention_epochs} training epochs; "
          f"cost = (identification + repair) / one training epoch.")
    print(summarize(rows, tuple(args.methods)))


if __name__ == "__main__":
    main()
