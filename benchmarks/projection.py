"""Projection repair on Fashion-MNIST: accuracy, gap closed, and cost.

For each noise rate and seed: train a SmallCNN on noisy labels and on clean labels, repair
the noisy one with verified samples, and report test accuracy and the share of the gap to
the clean-trained model that the repair closes. Then, on one trained model, compare the cost
of building the clean spaces our way (streamed float64 Grams + eigh) with the published
implementation's way (stack every activation row, subsample to 50,000 rows per layer, SVD),
in one run, next to one training epoch.

    python benchmarks/projection.py            # the full table in BENCHMARKS.md
    python benchmarks/projection.py --quick    # one seed, smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import VerifiedSplit
from hf_repair.evaluation import default_forward
from hf_repair.modeling.targets import find_target_modules
from hf_repair.projection.capture import GramCollector
from testbed.experiments import SmallCNN, evaluate_accuracy, train_classifier
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_fashion_mnist

from common import gap_closed, markdown_table, measure


def split_data(seed: int, num_train: int, num_verified: int):
    full = load_fashion_mnist("train")
    order = np.random.default_rng(seed).permutation(len(full))
    return full.select(order[:num_train]), full.select(order[num_train : num_train + num_verified])


def stacked_svd_spaces(model, targets, split: VerifiedSplit, max_rows: int = 50_000, seed: int = 0):
    """The published implementation's approach: keep every row, subsample, SVD."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = []
    for name, (module, adapter) in targets.items():
        def hook(mod, args, name=name, adapter=adapter):
            rows[name].append(adapter.input_rows(mod, args[0].detach(), None).float())
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in split.batches():
            default_forward(model, batch.inputs)
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(seed)
    spaces = {}
    for name, chunks in rows.items():
        stacked = torch.cat(chunks)
        if stacked.shape[0] > max_rows:
            stacked = stacked[torch.randperm(stacked.shape[0], generator=generator)[:max_rows]]
        u, s, _ = torch.linalg.svd(stacked.t(), full_matrices=False)
        spaces[name] = (u, s**2)
    return spaces


def streamed_gram_spaces(model, targets, split: VerifiedSplit):
    collector = GramCollector(targets, num_slots=1)
    with collector, torch.no_grad():
        for batch in split.batches():
            collector.begin_batch(0)
            default_forward(model, batch.inputs)
    return {name: collector.space(name, complete=True) for name in collector.groups()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.4])
    parser.add_argument("--num_train", type=int, default=10_000)
    parser.add_argument("--num_verified", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target_modules", default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one seed, 4,000 training samples")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.num_train = 1, 4000
    torch.set_num_threads(args.threads)
    test = load_fashion_mnist("test")

    rows, per_rate = [], {rate: [] for rate in args.rates}
    cost_model = None
    for seed in range(args.seeds):
        train, verified = split_data(seed, args.num_train, args.num_verified)
        clean_model = train_classifier(SmallCNN(), train, epochs=args.epochs, seed=seed, progress=False)
        clean_acc = evaluate_accuracy(clean_model, test)
        for rate in args.rates:
            noisy = corrupt_dataset(train, noise="symmetric", rate=rate, seed=seed)
            model = train_classifier(SmallCNN(), noisy, epochs=args.epochs, seed=seed, progress=False)
            noisy_acc = evaluate_accuracy(model, test)
            cost_model = cost_model or copy.deepcopy(model)
            config = RepairConfig(target_modules=args.target_modules, seed=seed, disable_tqdm=True)
            result = Repairer(model, config).repair(verified)
            repaired_acc = evaluate_accuracy(model, test)
            closed = gap_closed(repaired_acc, noisy_acc, clean_acc)
            per_rate[rate].append((noisy_acc, repaired_acc, clean_acc, closed))
            rows.append([f"{rate:.0%}", seed, noisy_acc, repaired_acc, clean_acc, closed,
                         result.metrics["alpha"], result.metrics["repair_time_s"]])
            print(markdown_table(["noise", "seed", "noisy", "repaired", "clean", "gap closed", "alpha", "repair s"],
                                 rows[-1:]), flush=True)

    summary = []
    for rate, values in per_rate.items():
        arr = np.array([v[:3] for v in values])
        closed = [v[3] for v in values if v[3] is not None]
        summary.append([f"{rate:.0%}", len(values), arr[:, 0].mean(), arr[:, 1].mean(), arr[:, 2].mean(),
                        float(np.mean(closed)) if closed else "n/a"])

    # Cost, measured in one run on one trained model and one verified split.
    train, verified = split_data(0, args.num_train, args.num_verified)
    noisy = corrupt_dataset(train, noise="symmetric", rate=args.rates[-1], seed=0)
    targets = find_target_modules(cost_model, args.target_modules)
    # Two folds read together are the whole split; the cost comparison needs no held-out fold.
    split = VerifiedSplit(verified, num_folds=2, batch_size=64, seed=0, input_names={"pixel_values"})
    list(split.batches())  # collate once so both approaches read the same cached batches
    with measure() as epoch_cost:
        train_classifier(copy.deepcopy(cost_model), noisy, epochs=1, seed=0, progress=False)
    with measure() as ours:
        streamed_gram_spaces(cost_model, targets, split)
    with measure() as published:
        stacked_svd_spaces(cost_model, targets, split)
    with measure() as full_repair:
        Repairer(copy.deepcopy(cost_model), RepairConfig(target_modules=args.target_modules, seed=0,
                                                         disable_tqdm=True)).repair(verified)
    cost = [
        ["one training epoch", epoch_cost.seconds, epoch_cost.peak_mib, 1.0],
        ["clean spaces: streamed Gram + eigh (ours)", ours.seconds, ours.peak_mib, ours.seconds / epoch_cost.seconds],
        ["clean spaces: stacked rows + SVD (published)", published.seconds, published.peak_mib,
         published.seconds / epoch_cost.seconds],
        ["whole repair (k-fold alpha selection)", full_repair.seconds, full_repair.peak_mib,
         full_repair.seconds / epoch_cost.seconds],
    ]

    print(f"\nSmallCNN on {args.num_train} Fashion-MNIST training images, {args.epochs} epochs, "
          f"{args.num_verified} verified, test on 10,000; target_modules={args.target_modules!r}\n")
    print(markdown_table(["noise", "seed", "noisy", "repaired", "clean", "gap closed", "alpha", "repair s"], rows))
    print()
    print(markdown_table(["noise", "seeds", "noisy", "repaired", "clean", "gap closed (mean)"], summary))
    print()
    print(markdown_table(["step", "seconds", "peak MiB", "x one epoch"], cost))
    print(f"\npublished / ours: {published.seconds / ours.seconds:.2f}x time, "
          f"{published.peak_mib / max(ours.peak_mib, 1e-9):.2f}x peak memory")


if __name__ == "__main__":
    main()
