"""Does the default flag rule flag the right share? The estimated noise rate against the truth, and the warning.

`flag_rule="noise_rate"` (the default) flags the estimated noise rate's share of lowest scores, so its
precision and recall hang on that estimate. For each setting a model is trained on noisy labels and
identified with the default `RepairConfig`; the table shows the estimate with its 95% interval, the true
rate, precision / recall of the flags, AUROC of the ranking, and whether identification warned that its
estimate is not to be trusted. The goal: within 5 points of the truth, or a warning. The same goal for the
flags' precision as identification estimates it without the truth (`estimated_flag_precision`, from the probe's
held-out predictions on the verified split at the estimated noise transition).

- Fashion-MNIST, SmallCNN (testbed): symmetric 40% (and again with 200 verified samples instead of 1,000);
  class-pair 20% (FASHION_MNIST_CONFUSABLE_PAIRS);
  human noise drawn from the CIFAR-10N annotators' 10x10 confusion (clean_label vs worse_label, ~40%,
  and vs random_label1, ~17%), class i of CIFAR-10 standing for class i of Fashion-MNIST.
- Rotten Tomatoes, the pretrained all-MiniLM-L6-v2 fine-tuned on reviews with 27.5% flipped labels.

    OMP_NUM_THREADS=1 nice python benchmarks/flag_rule.py            # about 5 minutes on 2 busy cores
    python benchmarks/flag_rule.py --settings "symmetric 40%"         # one setting
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, identify_harmful
from hf_repair.data import column_array
from testbed.experiments import SmallCNN, train_classifier
from testbed.noise import FASHION_MNIST_CONFUSABLE_PAIRS, corrupt_dataset
from testbed.offline_data import cifar10n_transition_matrix, load_fashion_mnist, load_rotten_tomatoes, minilm_path

from common import markdown_table

# setting -> (the noise, as corrupt_dataset arguments; the verified split's size if not --num_verified)
IMAGE_SETTINGS = {
    "symmetric 40%": (lambda: dict(noise="symmetric", rate=0.4), None),
    "symmetric 40%, 200 verified": (lambda: dict(noise="symmetric", rate=0.4), 200),
    "class-pair 20%": (lambda: dict(noise="asymmetric", rate=0.2, pairs=FASHION_MNIST_CONFUSABLE_PAIRS), None),
    "human (CIFAR-10N worse_label)": (
        lambda: dict(noise="transition", matrix=cifar10n_transition_matrix("worse_label")), None),
    "human (CIFAR-10N random_label1)": (
        lambda: dict(noise="transition", matrix=cifar10n_transition_matrix("random_label1")), None),
}
TEXT_SETTING = "text: MiniLM, flipped 27.5%"
SETTINGS = [*IMAGE_SETTINGS, TEXT_SETTING]
HEADER = ["setting", "train / verified", "true rate", "estimated rate", "95% interval", "error (points)", "precision",
          "recall", "AUROC", "warning", "goal met", "estimated precision [95% interval]", "estimated recall",
          "precision goal met"]
GOAL_POINTS = 5.0


def image_case(setting: str, args: argparse.Namespace) -> tuple[torch.nn.Module, datasets.Dataset, datasets.Dataset]:
    noise, num_verified = IMAGE_SETTINGS[setting]
    full = load_fashion_mnist("train")
    order = np.random.default_rng(args.seed).permutation(len(full))
    train = corrupt_dataset(full.select(order[: args.num_train]), seed=args.seed, **noise())
    verified = full.select(order[args.num_train : args.num_train + (num_verified or args.num_verified)])
    torch.manual_seed(args.seed)
    model = SmallCNN(width=16)
    train_classifier(model, train, epochs=20, batch_size=128, lr=2e-3, seed=args.seed, progress=False)
    return model, train, verified


def text_case(args: argparse.Namespace) -> tuple[torch.nn.Module, datasets.Dataset, datasets.Dataset]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    reviews = load_rotten_tomatoes().shuffle(seed=args.seed)
    encode = lambda batch: tokenizer(batch["text"], truncation=True, max_length=64, padding="max_length")  # noqa: E731
    train, verified = (
        reviews.select(rows).map(encode, batched=True).remove_columns("text").with_format("torch")
        for rows in (range(args.text_train), range(args.text_train, args.text_train + args.text_verified))
    )
    train = corrupt_dataset(train, "symmetric", args.text_noise, seed=args.seed)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    train_classifier(model, train, epochs=args.text_epochs, batch_size=32, lr=5e-5, seed=args.seed, progress=False)
    return model, train, verified


def measure(setting: str, args: argparse.Namespace) -> tuple[list[Any], str]:
    start = time.perf_counter()
    model, train, verified = text_case(args) if setting == TEXT_SETTING else image_case(setting, args)
    trained_s = time.perf_counter() - start
    s = identify_harmful(model, train, verified, RepairConfig(repair_seed=args.seed, repair_disable_tqdm=True)).summary
    truth = float(np.mean(column_array(train, "is_corrupted")))
    error = 100 * abs(s["estimated_noise_rate"] - truth)
    warned = s["noise_rate_warning"] is not None
    low, high = s["estimated_noise_rate_interval"]
    row = [setting, f"{len(train)} / {len(verified)}", truth, s["estimated_noise_rate"], f"[{low:.3f}, {high:.3f}]",
           error, s["precision"], s["recall"], s["auroc"], "yes" if warned else "no",
           "yes" if error <= GOAL_POINTS or warned else "NO"]
    if "estimated_flag_precision" in s:  # nothing flagged: no estimate
        precision, (low, high) = s["estimated_flag_precision"], s["estimated_flag_precision_interval"]
        close = 100 * abs(precision - s["precision"]) <= GOAL_POINTS
        row += [f"{precision:.3f} [{low:.3f}, {high:.3f}]", s["estimated_flag_recall"],
                "yes" if close or warned else "NO"]
    else:
        row += ["none (nothing flagged)", "", ""]
    print(f"  {setting}: trained in {trained_s:.0f} s, identified in {s['identify_time_s']:.0f} s", flush=True)
    return row, s["noise_rate_warning"] or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=";".join(SETTINGS),
                        help="';'-separated subset of: " + "; ".join(SETTINGS))
    parser.add_argument("--num_train", type=int, default=3000, help="Fashion-MNIST training samples")
    parser.add_argument("--num_verified", type=int, default=1000, help="Fashion-MNIST verified samples")
    parser.add_argument("--text_train", type=int, default=800)
    parser.add_argument("--text_verified", type=int, default=300)
    parser.add_argument("--text_noise", type=float, default=0.275)
    parser.add_argument("--text_epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("hf_repair").setLevel(logging.ERROR)  # the warnings are printed under the table
    datasets.disable_progress_bars()

    rows, warnings = [], []
    for setting in args.settings.split(";"):
        row, warning = measure(setting, args)
        rows.append(row)
        if warning:
            warnings.append(f"- {setting}: {warning}")
    print()
    print(markdown_table(HEADER, rows))
    if warnings:
        print("\nWarnings:\n" + "\n".join(warnings))


if __name__ == "__main__":
    main()
