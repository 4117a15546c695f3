"""A contrastive reference on the verified reviews alone (SetFit-style): does it identify better than `fresh`?

On the text task `auto` identifies with `fresh` (the pretrained MiniLM fine-tuned on the 300 verified reviews by
cross-entropy), which tells the corrupted training reviews at AUROC 0.78-0.82; a reference fine-tuned on 1,000 other
clean reviews (0.84-0.87) lets the same retrain close the gap (BENCHMARKS.md). This script builds a reference from
the same 300 verified reviews by the recipe SetFit (Tunstall et al., 2022) uses for few labels: the sentence encoder
is fine-tuned on pairs of verified reviews (per review and iteration one partner of its label and one of the other,
their embeddings' cosine similarity regressed on 1 or 0; cached beside the run). It prints, against the known
corruption:
- a logistic head (L2 by 3 folds) on the mean-pooled, normalised embeddings of the pretrained encoder and of the
  contrastive one: test accuracy and the AUROC of the given label's log-probability;
- the task's own model (`BertForSequenceClassification`) with the contrastive encoder as its body and its head
  refitted on the verified reviews by hf_repair (`method="head_refit"`), then `identify_harmful` with it as `auto`
  identifies with `fresh` (the probe, flagging at its estimated noise rate): test accuracy, AUROC, the flags'
  precision and recall, and the precision it estimates without the truth;
- `auto`'s retrain procedure alone on those flags (the erase fine-tune from the seeded initial weights, 3 epochs, no
  judging), once per repair seed, and the uniform average of those runs.

    OMP_NUM_THREADS=1 nice python3 benchmarks/contrastive_reference.py --task text --regime short --seed 0
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.data import column_array
from hf_repair.identification import auroc, identify_harmful
from hf_repair.retention import repair_with_finetuning
from hf_repair.trajectory.averaging import average_weights
from hf_repair.trajectory.checkpoints import load_weights
from testbed.finetuning import predictions
from testbed.offline_data import minilm_path

import finetune_regime as regime_benchmark
from common import markdown_table


def mean_pooled(encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding a MiniLM sentence encoder was trained to give: its token states averaged over the text."""
    states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


def embeddings(encoder: torch.nn.Module, part: datasets.Dataset) -> np.ndarray:
    encoder.eval()
    with torch.no_grad():
        rows = [mean_pooled(encoder, batch["input_ids"], batch["attention_mask"])
                for batch in (part[i:i + 64] for i in range(0, len(part), 64))]
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1).numpy()


def contrastive_encoder(verified: datasets.Dataset, seed: int, iterations: int, learning_rate: float, batch_size: int,
                        cache: Path) -> torch.nn.Module:
    """The pretrained encoder fine-tuned on pairs of verified reviews (SetFit's sampling and loss); cached in `cache`."""
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(minilm_path())
    if cache.exists():
        encoder.load_state_dict(torch.load(cache))
        return encoder
    labels = np.asarray(verified["labels"])
    pairs = []
    for _ in range(iterations):  # per review, one partner of its label and one of the other
        for i, label in enumerate(labels):
            pairs.append((i, int(generator.choice(np.flatnonzero(labels == label))), 1.0))
            pairs.append((i, int(generator.choice(np.flatnonzero(labels != label))), 0.0))
    generator.shuffle(pairs)
    steps = len(pairs) // batch_size
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 10% warm-up, then linear decay
        optimizer, lambda s: min(1.0, (s + 1) / max(0.1 * steps, 1)) * max(0.0, (steps - s) / max(steps, 1)))
    input_ids, attention_mask = verified["input_ids"], verified["attention_mask"]
    encoder.train()
    start = time.perf_counter()
    for step in range(steps):
        chunk = pairs[step * batch_size:(step + 1) * batch_size]
        first, second = (torch.tensor([pair[k] for pair in chunk]) for k in (0, 1))
        similarity = torch.nn.functional.cosine_similarity(mean_pooled(encoder, input_ids[first], attention_mask[first]),
                                                           mean_pooled(encoder, input_ids[second], attention_mask[second]))
        loss = torch.nn.functional.mse_loss(similarity, torch.tensor([pair[2] for pair in chunk]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"contrastive fine-tune: {steps} steps of {batch_size} pairs in {time.perf_counter() - start:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), cache)
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regime_benchmark.add_run_arguments(parser, task="text")
    parser.add_argument("--iterations", type=int, default=20,
                        help="Rounds of pair sampling, each one same-label and one other-label partner per verified "
                             "review (SetFit's default: 20).")
    parser.add_argument("--pair-learning-rate", type=float, default=2e-5, help="AdamW's peak learning rate.")
    parser.add_argument("--pair-batch-size", type=int, default=16, help="Pairs per step.")
    parser.add_argument("--repair-seeds", type=int, nargs="+", default=[0, 1000, 2000],
                        help="One retrain per seed, then their uniform average.")
    parser.add_argument("--retrain-epochs", type=float, default=3.0, help="The retrain's budget (auto's unmixed default).")
    args = parser.parse_args()
    if args.task != "text":
        parser.error("the contrastive reference is built on the MiniLM sentence encoder: --task text only.")
    regime_benchmark.quiet_scoring(args, logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # LogisticRegressionCV's defaults
    noisy = regime_benchmark.noisy_run(args)
    task, recipe = noisy.task, noisy.recipe
    given = np.asarray(task.noisy["labels"])
    corrupted = np.asarray(task.noisy["is_corrupted"]).astype(bool)
    verified_labels, test_labels = np.asarray(task.verified["labels"]), np.asarray(task.test["labels"])

    cache = noisy.run_dir / f"contrastive_s{args.seed}_it{args.iterations}_lr{args.pair_learning_rate:g}.pt"
    encoder = contrastive_encoder(task.verified, args.seed, args.iterations, args.pair_learning_rate,
                                  args.pair_batch_size, cache)
    rows = []
    for name, model in (("pretrained encoder", AutoModel.from_pretrained(minilm_path())), ("contrastive", encoder)):
        head = LogisticRegressionCV(Cs=10, cv=3, max_iter=2000).fit(embeddings(model, task.verified), verified_labels)
        score = head.predict_log_proba(embeddings(model, task.noisy))[np.arange(len(given)), given]
        test_accuracy = np.mean(head.predict(embeddings(model, task.test)) == test_labels)
        rows.append([f"{name}: logistic head on its mean-pooled embeddings", f"{100 * test_accuracy:.2f}",
                     f"{auroc(score, corrupted):.3f}", "", "", ""])

    # the task's own model with the contrastive encoder as its body: the library refits its head on the verified
    # reviews, then identifies with it (its probe) and flags at the noise rate it estimates
    config = RepairConfig(method="erase", **task.repair_kwargs, repair_seed=args.seed, repair_disable_tqdm=True,
                          retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size,
                          significance_test="none", min_improvement=-1.0)
    reference = task.new_model(args.seed)
    reference.base_model.load_state_dict(encoder.state_dict())
    Repairer(reference, dataclasses.replace(config, method="head_refit")).repair(task.verified)
    identification = identify_harmful(reference, task.noisy, task.verified, config)
    summary, flagged = identification.summary, identification.flagged_indices
    estimated = "none: nothing flagged"
    if summary.get("estimated_flag_precision") is not None:
        low, high = summary["estimated_flag_precision_interval"]
        estimated = f"{summary['estimated_flag_precision']:.3f} [{low:.3f}, {high:.3f}]"
    rows.append(["contrastive, in the task's model: its head refitted by hf_repair",
                 f"{100 * np.mean(predictions(reference, task.test) == test_labels):.2f}",
                 f"{auroc(column_array(identification.table, 'score'), corrupted):.3f}",
                 f"{len(flagged)} (noise rate {summary['estimated_noise_rate']:.3f} for {corrupted.mean():.3f})",
                 f"{corrupted[flagged].mean() if len(flagged) else float('nan'):.3f} (estimated {estimated})",
                 f"{corrupted[flagged].sum() / corrupted.sum():.3f}"])
    print(f"{task.name} {args.regime} seed {args.seed}; the noise rate's warning: {summary['noise_rate_warning']}")
    print(markdown_table(["reference, fitted on the verified reviews alone", "test %", "AUROC", "flagged",
                          "precision", "recall"], rows))

    # auto's retrain procedure alone on those flags (the erase fine-tune from the seeded initial weights)
    initial = task.new_model(args.seed).state_dict()
    rows, states = [], []
    for repair_seed in args.repair_seeds:
        model = copy.deepcopy(reference)
        load_weights(model, initial)
        start = time.perf_counter()
        retrain = dataclasses.replace(config, retention_epochs=args.retrain_epochs, repair_seed=repair_seed)
        metrics = repair_with_finetuning(model, retrain, task.verified, task.noisy, identification).metrics
        rows.append([str(repair_seed), f"{100 * np.mean(predictions(model, task.test) == test_labels):.2f}",
                     f"{metrics['steps']} of {metrics['max_steps']}", metrics["stop_reason"],
                     f"{time.perf_counter() - start:.0f}"])
        states.append({key: value.detach().clone() for key, value in model.state_dict().items()})
    load_weights(model, average_weights(states, latest=0))
    rows.append(["average of the above", f"{100 * np.mean(predictions(model, task.test) == test_labels):.2f}", "", "", ""])
    print(markdown_table(["repair seed", "retrain on its flags: test %", "steps", "stop", "seconds"], rows))


if __name__ == "__main__":
    main()
