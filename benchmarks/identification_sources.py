"""How well identification scores from several feature sources tell the known corruption (issue 11).

On `finetune_regime.py`'s cached noisy trajectories, every training sample is scored by the log-probability
of its given label under a linear probe fitted on the verified split (`hf_repair`'s own `fit_probe`, its L2
strength chosen on 3 folds) from the mean-pooled last hidden states of: the pretrained backbone the run
started from, the first checkpoint, the last checkpoint (the final model); and by the final model's own
given-label log-probability (its loss). "checkpoints" averages the probe scores of every checkpoint, "all"
averages the ranks of every score above. Each column is the AUROC of the score against the known corruption
(1.0: every corrupted sample scored below every clean one).

    OMP_NUM_THREADS=1 nice python3 benchmarks/identification_sources.py --tasks text vision --regimes short
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair.data import column_array
from hf_repair.identification import auroc
from hf_repair.identification.probes import fit_probe

import finetune_regime as regime_benchmark
from common import markdown_table

SOURCES = ["pretrained probe", "first checkpoint probe", "final probe", "final loss", "checkpoints (probe mean)", "all (rank mean)"]


@torch.no_grad()
def pooled_features(model: torch.nn.Module, data, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled last hidden states (over real tokens, or over patches) and log-softmax outputs."""
    model.eval()
    features, log_probs = [], []
    for batch in torch.utils.data.DataLoader(data.with_format("torch"), batch_size=batch_size):
        inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask") if key in batch}
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        if "attention_mask" in inputs:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            features.append((hidden * mask).sum(1) / mask.sum(1))
        else:
            features.append(hidden.mean(1))
        log_probs.append(out.logits.log_softmax(-1))
    return torch.cat(features).double(), torch.cat(log_probs).double()


def probe_scores(model: torch.nn.Module, task: regime_benchmark.Task, labels: np.ndarray) -> np.ndarray:
    """Given-label log-probabilities of the training samples under a probe fitted on the verified split."""
    verified_labels = torch.as_tensor(column_array(task.verified, "labels"))
    folds = torch.as_tensor(np.random.default_rng(0).integers(0, 3, len(verified_labels)))
    verified_features, _ = pooled_features(model, task.verified)
    probe = fit_probe(verified_features, verified_labels, folds, int(verified_labels.max()) + 1)
    train_features, _ = pooled_features(model, task.noisy)
    return probe.log_probs(train_features)[torch.arange(len(labels)), torch.as_tensor(labels)].numpy()


def run_setting(task, regime, recipes, seed, args) -> dict:
    run_dir = Path(args.cache_dir) / regime_benchmark.run_name(task, regime, recipes[regime]) / f"noisy_s{seed}"
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if not checkpoints:
        raise FileNotFoundError(f"No checkpoints in {run_dir}: run finetune_regime.py for this setting first.")
    labels = column_array(task.noisy, "labels")
    corrupted = column_array(task.noisy, "is_corrupted").astype(bool)
    scores = {"pretrained probe": probe_scores(task.new_model(seed), task, labels)}
    checkpoint_probes = []
    for path in checkpoints:
        model = task.model_class.from_pretrained(path)
        checkpoint_probes.append(probe_scores(model, task, labels))
        if path == checkpoints[-1]:
            _, log_probs = pooled_features(model, task.noisy)
            scores["final loss"] = log_probs[np.arange(len(labels)), labels].numpy()
    scores["first checkpoint probe"], scores["final probe"] = checkpoint_probes[0], checkpoint_probes[-1]
    scores["checkpoints (probe mean)"] = np.mean(checkpoint_probes, axis=0)
    scores["all (rank mean)"] = np.mean([scipy.stats.rankdata(s) for s in scores.values()], axis=0)
    row = {"task": task.name, "regime": regime, "seed": seed, "checkpoints": len(checkpoints)}
    row.update({source: auroc(scores[source], corrupted) for source in SOURCES})
    print(row, flush=True)
    return row


def summarize(rows: list[dict]) -> str:
    return markdown_table(["task", "regime", "seed", "checkpoints", *SOURCES],
                          [[r["task"], r["regime"], r["seed"], r["checkpoints"], *(f"{r[s]:.3f}" for s in SOURCES)]
                           for r in rows])


def main() -> None:
    parser = regime_benchmark.cached_runs_parser(__doc__)
    regime_benchmark.run_cached_settings(parser.parse_args(), run_setting, summarize)


if __name__ == "__main__":
    main()
