"""Finding the harmful training samples on Fashion-MNIST: precision, recall, AUROC and throughput.

For each noise setting (20% and 40% symmetric, 20% asymmetric confusable-pair flips), train a SmallCNN
on noisy labels, then score every training sample with each score hf_repair offers (and the loss-ranking
baseline), plus ablations of the influence (how per-class influences are aggregated, the preconditioner,
tracking the last hidden layer too), against the corruption that was injected. Precision and recall are
those of the default flag rule (the estimated noise rate's share of lowest scores); AUROC is
threshold-free. Throughput is the whole `identify` call (verified pass with the probe and refit fits,
training pass), the training pass alone, and a plain forward pass over the same data with the same loader.

    python benchmarks/identification.py                 # the table in BENCHMARKS.md
    python benchmarks/identification.py --quick         # smaller, offered scores only, for a smoke run
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, identify_harmful
from hf_repair.data import model_input_names, training_batches
from hf_repair.evaluation import default_forward
from testbed.experiments import SmallCNN, evaluate_accuracy, train_classifier
from testbed.noise import FASHION_MNIST_CONFUSABLE_PAIRS, corrupt_dataset
from testbed.offline_data import load_fashion_mnist

from common import markdown_table

SETTINGS = {
    "symmetric 20%": dict(noise="symmetric", rate=0.2),
    "symmetric 40%": dict(noise="symmetric", rate=0.4),
    "asymmetric 20%": dict(noise="asymmetric", rate=0.2, pairs=FASHION_MNIST_CONFUSABLE_PAIRS),
}

# (row label, RepairConfig overrides); the first rows are the offered scores with their defaults.
VARIANTS = [
    ("auto (= probe)", dict(score="auto")),
    ("refit", dict(score="refit")),
    ("influence", dict(score="influence")),
    ("projection", dict(score="projection")),
    ("combined (probe + influence)", dict(score="combined", combine_scores=["probe", "influence"])),
    ("combined (probe + projection)", dict(score="combined", combine_scores=["probe", "projection"])),
    ("loss baseline", dict(score="loss")),
    ("influence, aggregation min", dict(score="influence", influence_aggregation="min")),
    ("influence, aggregation mean", dict(score="influence", influence_aggregation="mean")),
    ("influence, K-FAC preconditioner", dict(score="influence", preconditioner="kfac")),
    ("influence, identity preconditioner", dict(score="influence", preconditioner="identity")),
    ("influence, head + last hidden layer", dict(score="influence", influence_depth=2)),
]


HEADER = ["setting", "score", "AUROC", "precision", "recall", "est. noise (probe)", "est. noise (neg. influence)",
          "true noise", "suggested label acc. (corrupted)"]


# (row label, RepairConfig overrides) timed on a larger set: the default, the autograd path, the projection.
THROUGHPUT_VARIANTS = [
    ("auto (= probe; influence of the closed-form head)", dict(score="auto")),
    ("influence, head + last hidden layer (autograd, K-FAC)", dict(score="influence", influence_depth=2)),
    ("projection", dict(score="projection")),
]


def plain_forward_seconds(model, dataset, batch_size: int) -> float:
    """One no-grad forward pass over the dataset with identify's loader: the reference throughput."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in training_batches(dataset, np.arange(len(dataset)), "labels", model_input_names(model), None, batch_size):
            batch.pop("labels")
            default_forward(model, batch)
    return time.perf_counter() - start


def measure_throughput(model, data, verified, seed: int, repeats: int) -> list[list[object]]:
    """Best of `repeats` runs (other processes share the CPU): identify, its training pass, a plain forward."""
    forward_s = min(plain_forward_seconds(model, data, RepairConfig().batch_size) for _ in range(repeats))
    rows = []
    for label, overrides in THROUGHPUT_VARIANTS:
        config = RepairConfig(repair_seed=seed, repair_disable_tqdm=True, **overrides)
        runs = [identify_harmful(model, data, verified, config).summary for _ in range(repeats)]
        total = min(r["identify_time_s"] for r in runs)
        train_pass = min(r["train_pass_s"] for r in runs)
        rows.append([label, len(data), f"{total:.1f}", f"{len(data) / total:.0f}", f"{train_pass:.1f}",
                     f"{len(data) / train_pass:.0f}", f"{forward_s:.1f}", f"{len(data) / forward_s:.0f}"])
        print(markdown_table(THROUGHPUT_HEADER, rows[-1:]).splitlines()[-1], flush=True)
    return rows


THROUGHPUT_HEADER = ["score", "samples", "identify s", "identify samples/s", "training pass s", "training pass samples/s",
                     "plain forward s", "plain forward samples/s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--verified-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: " + ", ".join(SETTINGS))
    parser.add_argument("--variants", default="all", help="'all', 'scores' (the offered scores only) or row labels, ';'-separated")
    parser.add_argument("--throughput-size", type=int, default=20000, help="samples scored for the throughput table")
    parser.add_argument("--repeats", type=int, default=3, help="throughput: best of this many runs")
    parser.add_argument("--quick", action="store_true", help="2000 samples, 8 epochs, offered scores only")
    parser.add_argument("--output", default=None, help="also write the markdown section to this file")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.epochs, args.variants, args.throughput_size, args.repeats = 2000, 8, "scores", 4000, 1
    torch.set_num_threads(args.threads)
    variants = VARIANTS
    if args.variants == "scores":
        variants = VARIANTS[:7]
    elif args.variants != "all":
        wanted = args.variants.split(";")
        variants = [v for v in VARIANTS if v[0] in wanted]

    full = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    order = np.random.default_rng(args.seed).permutation(len(full))
    clean_train = full.select(order[: args.train_size])
    verified = full.select(order[args.train_size : args.train_size + args.verified_size])

    rows, models, trained = [], [], {}
    for setting in args.settings.split(","):
        train = corrupt_dataset(clean_train, seed=args.seed, **SETTINGS[setting])
        torch.manual_seed(args.seed)  # the initial weights: the same model for every run of this command
        model = SmallCNN(width=args.width)
        start = time.perf_counter()
        train_classifier(model, train, epochs=args.epochs, seed=args.seed, progress=False)
        train_s = time.perf_counter() - start
        models.append([setting, f"{evaluate_accuracy(model, test):.4f}",
                       f"{evaluate_accuracy(model, train):.4f}", f"{train_s:.0f}"])
        trained[setting] = model
        for label, overrides in variants:
            config = RepairConfig(repair_seed=args.seed, repair_disable_tqdm=True, **overrides)
            result = identify_harmful(model, train, verified, config)
            s = result.summary
            estimates = s["noise_rate_estimates"]
            rows.append([setting, label, s["auroc"], s["precision"], s["recall"], estimates["probe_disagreement"],
                         estimates["negative_influence"],
                         float(np.mean(train.with_format("numpy")["is_corrupted"])), s["suggested_label_accuracy_on_corrupted"]])
            print(markdown_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)

    throughput_setting = "symmetric 40%" if "symmetric 40%" in trained else next(iter(trained))
    throughput_data = full.select(order[: args.throughput_size])
    throughput = measure_throughput(trained[throughput_setting], throughput_data, verified, args.seed, args.repeats)

    command = "python benchmarks/identification.py " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items() if k not in ("quick", "output") and v is not None
    )
    section = [
        "## Finding harmful training samples (`Repairer.identify`)",
        "",
        f"SmallCNN (width {args.width}) trained {args.epochs} epochs on {args.train_size} Fashion-MNIST samples with "
        f"injected noise, {args.verified_size} verified samples, seed {args.seed}, {args.threads} CPU threads. "
        "Precision and recall use the default flag rule (flag the estimated noise rate's share of lowest scores, "
        "the rate estimated from the probe's disagreement with the given labels); AUROC ranks all samples. "
        "The suggested label is the probe's prediction; its accuracy is measured on the corrupted samples.",
        "",
        markdown_table(["setting", "model test acc.", "train acc. (noisy labels)", "train s"], models),
        "",
        markdown_table(HEADER, rows),
        "",
        f"Throughput on {args.throughput_size} Fashion-MNIST training images with the {throughput_setting} model, best "
        f"of {args.repeats} runs: the whole `identify` call (its verified pass with the probe fit, and for `projection` "
        "the projection repair, are fixed costs that do not grow with the training set), its pass over the training "
        "set alone, and a plain no-grad forward pass over the same data with the same loader:",
        "",
        markdown_table(THROUGHPUT_HEADER, throughput),
        "",
        f"Command: `{command}`",
    ]
    text = "\n".join(section)
    print()
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
