"""Variants of the projection repair on one noisy-trained model: what helps beyond the defaults?

    cd benchmarks && python projection_variants.py

Trains one SmallCNN on 10,000 Fashion-MNIST images with 40% symmetric noise (seed 0), then
repairs copies of it with: the default (one alpha, target_modules="all"), one alpha per layer,
linear layers only, and the default followed by re-fitting the classification head on the
verified split (the clean reference retention uses), plus that refit alone.
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
from hf_repair.data import stratified_folds
from hf_repair.identification.probes import refit_head
from testbed.experiments import SmallCNN, evaluate_accuracy, train_classifier
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_fashion_mnist

from common import gap_closed, markdown_table


@torch.no_grad()
def refit_classifier(model: SmallCNN, verified) -> None:
    """Replace the last Linear by the proximal logistic-regression refit on verified head inputs."""
    batch = verified[:]
    features = model.classifier[:3](model.features(batch["pixel_values"])).double()
    rows = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    labels = torch.as_tensor(np.asarray(batch["labels"]))
    folds = torch.zeros(len(labels), dtype=torch.long)
    for fold, members in enumerate(stratified_folds(labels.numpy(), 3, seed=0)):
        folds[members] = fold
    head = model.classifier[3]
    weight = torch.cat([head.weight, head.bias[:, None]], dim=1)
    fitted = refit_head(rows, labels, folds, weight).weight
    head.weight.copy_(fitted[:, :-1])
    head.bias.copy_(fitted[:, -1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.4)
    args = parser.parse_args()
    full, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    order = np.random.default_rng(0).permutation(len(full))
    train = full.select(order[: args.num_train])
    verified = full.select(order[args.num_train : args.num_train + 1000])
    torch.manual_seed(0)
    noisy = train_classifier(SmallCNN(), corrupt_dataset(train, rate=args.rate, seed=0), args.epochs, progress=False)
    torch.manual_seed(0)
    clean_acc = evaluate_accuracy(train_classifier(SmallCNN(), train, args.epochs, progress=False), test)
    noisy_acc = evaluate_accuracy(noisy, test)

    def repaired(config: RepairConfig | None, refit: bool = False) -> float:
        model = copy.deepcopy(noisy)
        if config is not None:
            Repairer(model, config).repair(verified)
        if refit:
            refit_classifier(model, verified)
        return evaluate_accuracy(model, test)

    base = dict(seed=0, disable_tqdm=True)
    variants = {
        "projection (default: one alpha, all layers)": repaired(RepairConfig(target_modules="all", **base)),
        "projection, one alpha per layer": repaired(RepairConfig(target_modules="all", alpha_scope="layer", **base)),
        "projection, linear layers only": repaired(RepairConfig(target_modules="all-linear", **base)),
        "head refit on the verified split alone": repaired(None, refit=True),
        "projection, then head refit": repaired(RepairConfig(target_modules="all", **base), refit=True),
    }
    rows = [["trained on noisy labels", noisy_acc, 0.0]]
    rows += [[name, acc, gap_closed(acc, noisy_acc, clean_acc)] for name, acc in variants.items()]
    rows.append(["trained on clean labels", clean_acc, 1.0])
    print(markdown_table(["model", "test accuracy", "gap closed"], rows))


if __name__ == "__main__":
    main()
