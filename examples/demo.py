"""hf_repair demo: train on noisy labels, repair with a small verified split, compare.

Fashion-MNIST (real images, installed offline by `scripts/setup.sh`), 40% symmetric label noise
on the training set, 1,000 verified samples whose labels are known to be right. Trains a
SmallCNN on the noisy labels and one on the clean labels (the ceiling a retrain would reach),
repairs copies of the noisy one with the two methods -- the one-shot projection, and projection
followed by beneficial-retention fine-tuning on the training set -- and prints test accuracy.

    python examples/demo.py                      # two SmallCNNs, 10,000 images x 20 epochs each
    python examples/demo.py --num_train 4000     # quicker
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from testbed.experiments import SmallCNN, evaluate_accuracy, train_classifier
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise_rate", type=float, default=0.4, help="share of training labels flipped")
    parser.add_argument("--num_train", type=int, default=10_000, help="training images (of 60,000)")
    parser.add_argument("--num_verified", type=int, default=1000, help="verified (hand-checked) samples")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print("Loading Fashion-MNIST ...", flush=True)
    full, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    order = np.random.default_rng(args.seed).permutation(len(full))
    clean_train = full.select(order[: args.num_train])
    verified = full.select(order[args.num_train : args.num_train + args.num_verified])
    noisy_train = corrupt_dataset(clean_train, noise="symmetric", rate=args.noise_rate, seed=args.seed)
    print(f"{args.num_train} training images, {sum(noisy_train['is_corrupted'])} with a wrong label; "
          f"{len(verified)} verified; {len(test)} test.", flush=True)

    start = time.perf_counter()
    print("Training on the noisy labels ...", flush=True)
    torch.manual_seed(args.seed)  # the same initial weights for both models
    model = train_classifier(SmallCNN(), noisy_train, epochs=args.epochs, seed=args.seed)
    epoch_s = (time.perf_counter() - start) / args.epochs
    print("Training on the clean labels (the retrain ceiling, for comparison only) ...", flush=True)
    torch.manual_seed(args.seed)
    ceiling = train_classifier(SmallCNN(), clean_train, epochs=args.epochs, seed=args.seed)

    noisy_acc, clean_acc = evaluate_accuracy(model, test), evaluate_accuracy(ceiling, test)
    rows = [("trained on noisy labels", noisy_acc, None)]
    for method in ("projection", "projection+retention"):
        print(f"Repairing a copy with method={method!r} ...", flush=True)
        repaired = copy.deepcopy(model)
        config = RepairConfig(method=method, target_modules="all", seed=args.seed)
        # The fine-tuning methods also read the training set: they find the harmful samples in it first.
        result = Repairer(repaired, config).repair(verified, train_dataset=noisy_train)
        print(result.summary(), flush=True)
        rows.append((f"repaired by hf_repair ({method})", evaluate_accuracy(repaired, test), result.metrics["repair_time_s"]))
    rows.append(("retrained on clean labels (ceiling)", clean_acc, None))

    gap = clean_acc - noisy_acc
    print()
    print(f"| {'model':<46} | test accuracy | gap closed | repair cost |")
    print(f"|{'-' * 48}|{'-' * 15}|{'-' * 12}|{'-' * 13}|")
    for name, accuracy, seconds in rows:
        closed = f"{(accuracy - noisy_acc) / gap:.0%}" if gap > 0 and seconds is not None else ""
        cost = f"{seconds / epoch_s:.1f} epochs" if seconds is not None else ""
        print(f"| {name:<46} | {accuracy:>13.2%} | {closed:>10} | {cost:>11} |")
    print(f"\nGap closed: the share of the gap between the noisy and the clean-trained model that the repair "
          f"closes. Repair cost: wall time (identification included) in epochs of the noisy training run "
          f"({epoch_s:.1f}s each).")


if __name__ == "__main__":
    main()
