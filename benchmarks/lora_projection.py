"""How to project a LoRA fine-tune: the adapter's input side (`A <- A M`) or the merged weight (`(W0 + s B A) M`)?

A LoRA layer applies `W0 + s B A`. hf_repair projects `A <- A M`, which keeps the repaired model a LoRA of the
same rank (saved and reloaded as a peft adapter, frozen base untouched). The alternative projects the
merged weight, which changes `W0` too and can only be saved as a merged model. Per seed this script

1. LoRA-fine-tunes (rank 8, every linear layer of the blocks, the head in `modules_to_save`) a pretrained
   model on symmetric label noise, and for the ceiling on the clean labels: "vision", a small ViT pretrained
   on clean Fashion-MNIST classes 0-4 (the backbone of finetune_regime.py, cached) on classes 5-9; "text",
   MiniLM-L6 on Rotten Tomatoes (reviews of 48 tokens at most);
2. scores on test: the noisy model; `Repairer(method="projection")` on the PeftModel ("adapter": A <- A M
   and the head); the same on `merge_and_unload()` of it, the same layers ("merged"),
   each with hf_repair's defaults (alpha by k-fold, adopted
   only if its held-out gain is significant), and forced (adopted whatever the gate says) to see the
   projection itself.

    OMP_NUM_THREADS=1 nice python3 benchmarks/lora_projection.py --seeds 0 1 2
    OMP_NUM_THREADS=1 nice python3 benchmarks/lora_projection.py --task text --train 1000 --test 1000 --epochs 6 --lr 5e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from testbed.finetuning import fashion_mnist_classes, new_vit_classifier, predictions, pretrained_vit
from testbed.noise import corrupt_dataset
from testbed.offline_data import load_rotten_tomatoes, minilm_path

from common import gap_closed, markdown_table

LORA_TARGETS = {"vision": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
                "text": ["query", "key", "value", "dense"]}


def lora_finetune(new_model: Any, task: str, train: Any, epochs: int, lr: float, seed: int) -> Any:
    """A LoRA fine-tune (rank 8, alpha 16, head whole) of the pretrained model with a plain AdamW loop."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(new_model(seed), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[task],
                                                       modules_to_save=["classifier"]))
    inputs = [c for c in ("pixel_values", "input_ids", "attention_mask") if c in train.column_names]
    columns = {c: torch.as_tensor(column_array(train, c)) for c in [*inputs, "labels"]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(columns["labels"]), generator=generator).split(64 if task == "vision" else 16):
            loss = model(**{c: t[batch] for c, t in columns.items()}).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def vision_data(seed: int, args: argparse.Namespace) -> tuple[Any, ...]:
    """The ViT of finetune_regime.py pretrained on Fashion-MNIST classes 0-4 (cached); data of classes 5-9."""
    backbone = pretrained_vit(args.cache_dir, classes=(0, 1, 2, 3, 4), epochs=15)
    pool, test = fashion_mnist_classes("train", (5, 6, 7, 8, 9)), fashion_mnist_classes("test", (5, 6, 7, 8, 9))
    order = np.random.default_rng(seed).permutation(len(pool))
    clean = pool.select(order[:args.train])
    verified = pool.select(order[args.train:args.train + args.verified])
    test = test.select(np.random.default_rng(0).permutation(len(test))[:args.test])
    names = pool.features["labels"].names
    return clean, verified, test, lambda s: new_vit_classifier(backbone, names, s)


def text_data(seed: int, args: argparse.Namespace) -> tuple[Any, ...]:
    """The pretrained MiniLM-L6 on Rotten Tomatoes, as in finetune_regime.py."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    reviews = load_rotten_tomatoes().train_test_split(test_size=args.test, seed=0)
    pool = reviews["train"].shuffle(seed=seed)

    def encode(part: Any) -> Any:
        tokens = part.map(lambda b: tokenizer(b["text"], truncation=True, max_length=48, padding="max_length"),
                          batched=True)
        return tokens.remove_columns("text").with_format("torch")

    def new_model(s: int) -> Any:
        transformers.set_seed(s)
        return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    return (encode(pool.select(range(args.train))), encode(pool.select(range(args.train, args.train + args.verified))),
            encode(reviews["test"]), new_model)


def repaired(model: Any, verified: Any, seed: int, forced: bool, merge: bool, targets: Any) -> tuple[Any, dict]:
    model = copy.deepcopy(model)
    if merge:
        model = model.merge_and_unload()
    gate = dict(min_improvement=-1.0, significance_test="none") if forced else {}
    result = Repairer(model, RepairConfig(method="projection", target_modules=targets, seed=seed,
                                          repair_disable_tqdm=True, **gate)).repair(verified)
    return model, {"adopted": result.adopted, "alpha": result.metrics["alpha"], "layers": len(result.layers)}


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    clean, verified, test, new_model = (vision_data if args.task == "vision" else text_data)(seed, args)
    noisy = corrupt_dataset(clean, "symmetric", args.noise, seed=seed)
    labels = column_array(test, "labels")
    accuracy = lambda m: float(np.mean(predictions(m, test) == labels))  # noqa: E731
    noisy_model = lora_finetune(new_model, args.task, noisy, args.epochs, args.lr, seed)
    row: dict[str, Any] = {"seed": seed, "load": os.getloadavg()[0], "noisy": accuracy(noisy_model),
                           "clean": accuracy(lora_finetune(new_model, args.task, clean, args.epochs, args.lr, seed))}
    adapter_layers = ["classifier", *LORA_TARGETS[args.task]]
    for forced in (False, True):
        for name, merge, targets in (("adapter", False, adapter_layers), ("merged", True, adapter_layers)):
            key = f"{name}{'_forced' if forced else ''}"
            model, extra = repaired(noisy_model, verified, seed, forced, merge, targets)
            row[key] = accuracy(model)
            row.update({f"{key}_{k}": v for k, v in extra.items()})
            print(f"seed {seed} {key}: {row[key]:.4f} {extra}", flush=True)
    return row


METHODS = ("adapter", "merged", "adapter_forced", "merged_forced")


def summarize(rows: list[dict[str, Any]]) -> str:
    per_seed = [[r["seed"], f"{r['load']:.1f}", f"{100 * r['noisy']:.2f}", f"{100 * r['clean']:.2f}"]
                + [f"{100 * r[m]:.2f}" + ("" if r[f"{m}_adopted"] else " n/a") + f" (a={r[f'{m}_alpha'] or 0:g})"
                   for m in METHODS] for r in rows]
    gaps = [[f"{100 * np.mean([gap_closed(r[m], r['noisy'], r['clean']) for r in rows]):.0f} ± "
             f"{100 * np.std([gap_closed(r[m], r['noisy'], r['clean']) for r in rows]):.0f}" for m in METHODS]]
    return ("Per-seed test accuracy % ('n/a': not adopted, model unchanged; a = chosen alpha):\n"
            + markdown_table(["seed", "load", "noisy", "clean", *METHODS], per_seed)
            + "\n\nGap closed on test %, mean ± std over seeds:\n" + markdown_table(list(METHODS), gaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="vision", choices=["vision", "text"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--verified", type=int, default=300)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_repair_benchmarks",
                                                            "finetune_regime"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(json.dumps(vars(args)))
    print(summarize(rows))


if __name__ == "__main__":
    main()
