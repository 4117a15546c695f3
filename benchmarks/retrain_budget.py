"""The retrain refinement run alone, on the whole verified split, for several budgets (`retrain_epochs`).

`auto` judges retrain on nested verified folds and adopts it only on a significant held-out gain; this
script shows what the procedure itself reaches on test, without the judging: on one cached trajectory of
`finetune_regime.py` (vision task; `--lora` for its LoRA runs), it identifies the harmful training samples
with the final (or early-stopped) model as erase does, loads the seeded initial weights the run started
from, and runs the erase fine-tune from them for each budget. `--base trajectory` identifies with every
checkpoint of the run instead: the mean of their probe scores ranks the samples, and the first checkpoint's
flag count (the model that memorised least) says how many to drop; `--base fresh` identifies with auto's `fresh`
model (the initial weights fine-tuned on the verified split alone, cached beside the run under its settings); `--base outside`
(text) with a model fine-tuned on `--outside-size` clean reviews that are in neither the training set, the verified
split nor test: a reference no repair has, to show what a better identifying model would buy (by the run's recipe;
`--outside-fresh`: as `fresh` is built, on those reviews instead of the verified split). `--repair-seeds` runs
each budget once per seed and adds the uniform average of those runs' weights. `--scores` prints how well each
identification score tells the known corruption (the first one flags); `--rounds N` identifies again with each
retrained model and retrains from the initial weights, N times in all. `--forward` runs auto's forward refinement
instead: nothing dropped, every training label learnt through the noise transition the identification estimates.
`--fresh-runs N` makes the fresh model the weight average of N such fine-tunes (run r at repair seed seed + 1000 r,
as auto's runs per fold), and `--from-base` fine-tunes the identifying model itself without the flagged samples
(auto's erase) instead of the initial weights: together, what a chosen fresh-based erase or retrain would end with if
it were refitted on every verified sample (`fold_identification.py` shows what the nested folds' identifiers get).
`--reweight` runs auto's reweight refinement instead: nothing dropped, every training sample's loss weighed by the
probability that its label is right (the identifying probe's prediction through the estimated noise transition).
`--fold-calibrated` flags, forward-corrects and reweighs by the noise rate fresh's fold models calibrate on the
verified folds they did not learn, as `auto` does on fresh (the fold models cached beside the run as
`fold_identification.py`'s).

    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --regime short --seed 0 --epochs 3 10
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --base trajectory --repair-seeds 0 1 2
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --task text --base fresh --scores probe loss --rounds 3
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --epochs 10 --set small_loss_trim=0.1
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --task text --base fresh --forward --repair-seeds 0 1 2
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --task text --base fresh --fresh-runs 2 --from-base --epochs 1 --repair-seeds 0 1000 2000
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --task text --base fresh --fresh-runs 2 --fold-calibrated --repair-seeds 0 1000 2000
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --task text --base fresh --fresh-runs 2 --fold-calibrated --reweight --repair-seeds 0 1000 2000
    OMP_NUM_THREADS=1 nice python3 benchmarks/retrain_budget.py --task text --base outside --outside-size 1000 --repair-seeds 0 1000 2000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig
from hf_repair.config.identification import IDENTIFICATION_SCORES
from hf_repair.data import column_array, stratified_folds
from hf_repair.evaluation import default_forward, split_verified
from hf_repair.identification import IdentificationResult, auroc, identify_harmful
from hf_repair.retention import RetentionRepair, finetune_learning_rate, repair_with_finetuning
from hf_repair.trajectory.averaging import average_weights
from hf_repair.trajectory.candidates import through_the_noise, weighed_by_confidence
from hf_repair.trajectory.checkpoints import load_weights
from hf_repair.trajectory.heldout_noise import calibrate_on_fold_models, with_noise_rate
from testbed.finetuning import Trajectory, average_states, finetune, load_checkpoint, predictions

import finetune_regime as regime_benchmark
from common import add_config_overrides, markdown_table


def flagged_option(value: str) -> str:
    """'identified', 'corrupted' or a positive count, checked before anything loads."""
    if value in ("identified", "corrupted") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"expected 'identified', 'corrupted' or a positive number of samples, got {value!r}")


def positive_int(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regime_benchmark.add_run_arguments(parser)
    parser.add_argument("--epochs", type=float, nargs="+", default=[3.0], help="retrain_epochs budgets to run.")
    parser.add_argument("--base", default="final", choices=["final", "early_stop", "trajectory", "fresh", "outside"],
                        help="The model that identifies (trajectory: every checkpoint; fresh: auto's; outside: one trained "
                             "on other clean reviews; see above).")
    parser.add_argument("--outside-size", type=positive_int, default=1000,
                        help="With --base outside: how many clean reviews outside the task it is fine-tuned on.")
    parser.add_argument("--outside-fresh", action="store_true",
                        help="With --base outside: build it as auto builds fresh (--fresh-runs runs averaged), not by "
                             "the run's recipe.")
    parser.add_argument("--scores", nargs="+", default=["auto"], choices=IDENTIFICATION_SCORES,
                        help="Identification scores to compare on the known corruption; the first one flags.")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="Retrain this many times, each identifying with the previous retrain's model.")
    parser.add_argument("--repair-seeds", type=int, nargs="+", default=None,
                        help="Run each budget once per repair seed and add the average of their weights "
                             "(default: the run's seed, once).")
    parser.add_argument("--lora", action="store_true", help="The LoRA runs of finetune_regime.py --lora.")
    parser.add_argument("--flagged", default="identified", type=flagged_option,
                        help="What retrain drops: 'identified' (the library's flags), 'corrupted' (the known "
                             "corruption), or a number K (the K samples with the lowest identification score).")
    parser.add_argument("--forward", action="store_true",
                        help="Drop nothing: learn every training label through the estimated noise transition.")
    parser.add_argument("--reweight", action="store_true",
                        help="Drop nothing: weigh every training sample's loss by the probability that its label is right.")
    parser.add_argument("--fresh-runs", type=positive_int, default=1,
                        help="With --base fresh: the weight average of this many fresh fine-tunes (repair seeds seed + 1000 r).")
    parser.add_argument("--from-base", action="store_true",
                        help="Fine-tune the identifying model without the flags (erase) instead of the initial weights.")
    parser.add_argument("--fold-calibrated", action="store_true",
                        help="With --base fresh: flag and forward-correct by the noise rate fresh's fold models calibrate "
                             "(auto's), not the rate fresh's own identification estimates.")
    add_config_overrides(parser, "small_loss_trim=0.1")
    args = parser.parse_args()
    if args.fold_calibrated and args.base != "fresh":
        parser.error("--fold-calibrated calibrates by fresh's fold models; use it with --base fresh.")
    if args.reweight and args.base == "trajectory":
        parser.error("--reweight weighs by one identifying model's probe; use --base final, early_stop or fresh.")
    if args.base == "trajectory" and len(args.scores) > 1:
        parser.error("--base trajectory ranks by the mean probe score of every checkpoint; compare --scores on one model.")
    if args.forward and args.reweight:
        parser.error("--forward and --reweight are two refinements; run one at a time.")
    for option, given in (("--forward", args.forward), ("--reweight", args.reweight)):
        if given and (args.rounds > 1 or args.flagged != "identified"):
            parser.error(f"{option} drops nothing and identifies once; leave --rounds and --flagged at their defaults.")
    if args.fresh_runs > 1 and not (args.base == "fresh" or args.outside_fresh):
        parser.error("--fresh-runs averages fresh fine-tunes; use it with --base fresh or --outside-fresh.")
    if args.base == "outside" and (args.task != "text" or args.lora):
        parser.error("--base outside takes clean reviews from outside the text task; use --task text without --lora.")
    if args.outside_fresh and args.base != "outside":
        parser.error("--outside-fresh builds the outside reference; use it with --base outside.")
    if args.from_base and (args.forward or args.reweight or args.rounds > 1):
        parser.error("--from-base fine-tunes the identifying model once; leave --forward, --reweight and --rounds at "
                     "their defaults.")
    if args.rounds > 1 and args.flagged != "identified":
        parser.error(f"--rounds identifies again with each retrained model, which --flagged {args.flagged} would override; "
                     "use --flagged identified with --rounds.")
    regime_benchmark.quiet_scoring(args, logging.ERROR)

    noisy = regime_benchmark.noisy_run(args, lora=args.lora)
    task, recipe, run_dir, run = noisy.task, noisy.recipe, noisy.run_dir, noisy.trajectory
    labels = column_array(task.test, "labels")
    accuracy = lambda model: float(np.mean(predictions(model, task.test) == labels))  # noqa: E731
    base = load_checkpoint(task.model_class, run.best if args.base == "early_stop" else run.final.path)
    # as auto's retrain: the erase fine-tune with the Trainer's learning rate and batch size, no gate of its own
    config = RepairConfig(method="erase", **task.repair_kwargs, repair_seed=args.seed, repair_disable_tqdm=True,
                          retention_learning_rate=recipe.lr, retention_batch_size=recipe.batch_size,
                          significance_test="none", min_improvement=-1.0, score=args.scores[0])
    config = dataclasses.replace(config, **dict(args.set))  # --set wins over the settings above
    initial = task.new_model(args.seed).state_dict()  # the seeded initialisation the noisy run started from
    if args.base == "fresh":
        runs = fresh_runs(base, initial, task.verified, config, run_dir, args.seed, args.fresh_runs)
        for run_index, state in enumerate(runs):
            load_weights(base, state)
            print(f"fresh run {run_index} on the verified split: {100 * accuracy(base):.2f}% on test")
        fresh = average_weights(runs, latest=0)
        load_weights(base, fresh)
    if args.base == "outside":
        load_weights(base, outside_reference(base, initial, args, noisy, config))
        print(f"the reference on {args.outside_size} clean reviews outside the task: {100 * accuracy(base):.2f}% on test")
    corrupted = column_array(task.noisy, "is_corrupted").astype(bool)
    if args.base != "trajectory":
        for score in args.scores[1:]:
            scored = identify_harmful(base, task.noisy, task.verified, dataclasses.replace(config, score=score))
            print(f"score {score}: {describe(scored, corrupted)}")
    identification = (trajectory_identification(run, task, config) if args.base == "trajectory"
                      else identify_harmful(base, task.noisy, task.verified, config,
                                            keep_reference_log_probs=args.reweight))
    if args.fold_calibrated:
        folds = fold_freshes(base, initial, task.verified, config, run_dir, args.seed, args.fresh_runs)
        calibration = calibrate_on_fold_models(base, folds.__getitem__, split_verified(base, task.verified, config),
                                               task.noisy, config, default_forward, None)
        load_weights(base, fresh)
        estimate = calibration.noise
        print(f"noise rate {corrupted.mean():.3f}: fresh's identification estimates "
              f"{identification.summary['estimated_noise_rate']:.3f}, its fold models {estimate.rate:.3f} "
              f"[{estimate.interval[0]:.3f}, {estimate.interval[1]:.3f}]")
        identification = with_noise_rate(identification, calibration, config)
    if args.flagged != "identified":
        flagged = (np.flatnonzero(corrupted) if args.flagged == "corrupted"
                   else np.sort(np.argsort(column_array(identification.table, "score"))[:int(args.flagged)]))
        identification = dataclasses.replace(identification, flagged_indices=flagged)
    transition = weights = None
    if args.reweight:
        identification, weights = weighed_by_confidence(identification)
        print(f"reweight: mean weight {weights[~corrupted].mean():.3f} on the clean labels, {weights[corrupted].mean():.3f} "
              f"on the corrupted ones (AUROC {auroc(weights, corrupted):.3f})")
    if args.forward:
        identification, transition = through_the_noise(identification)
        print(f"forward: the estimated P(given = true | true) by class {np.round(transition.diagonal().numpy(), 3)}, "
              f"noise rate {identification.summary['estimated_noise_rate']:.3f}")
    identified_by = "every checkpoint" if args.base == "trajectory" else f"the {args.base} model"
    print(f"{task.name} {args.regime} seed {args.seed}, flagged: {args.flagged} (by {identified_by}): "
          f"{describe(identification, corrupted)}; load {os.getloadavg()[0]:.1f}")
    rows = [["none (the base)", "", "", f"{100 * accuracy(base):.2f}", "", "", "", ""]]
    start_weights = {name: p.detach().clone() for name, p in base.state_dict().items()} if args.from_base else initial
    for epochs in args.epochs:
        runs = []
        for repair_seed in args.repair_seeds or [args.seed]:
            model, flags = copy.deepcopy(base), identification
            retrain = dataclasses.replace(config, retention_epochs=epochs, repair_seed=repair_seed)
            for round_ in range(1, args.rounds + 1):
                if round_ > 1:
                    flags = identify_harmful(model, task.noisy, task.verified, retrain)
                load_weights(model, start_weights)
                start = time.perf_counter()
                m = repair_with_finetuning(model, retrain, task.verified, task.noisy, flags,
                                           noise_transition=transition, training_weights=weights).metrics
                rows.append([f"{epochs:g}", str(repair_seed), str(round_), f"{100 * accuracy(model):.2f}",
                             describe(flags, corrupted), f"{m['steps']} of {m['max_steps']}",
                             m["stop_reason"], f"{time.perf_counter() - start:.0f}"])
            runs.append({name: p.detach().clone() for name, p in model.state_dict().items()})
        if len(runs) > 1:
            load_weights(model, average_states(runs))
            rows.append([f"{epochs:g}", "average of the above", "", f"{100 * accuracy(model):.2f}", "", "", "", ""])
    print(markdown_table(["retrain_epochs", "repair seed", "round", "test %", "flagged by that round's model",
                          "steps", "stop", "seconds"], rows))


def describe(identification: IdentificationResult, corrupted: np.ndarray) -> str:
    """How many samples an identification flags and how well its flags and score match the known corruption."""
    flagged = identification.flagged_indices
    precision = corrupted[flagged].mean() if len(flagged) else float("nan")
    score_auroc = auroc(column_array(identification.table, "score"), corrupted)
    summary, estimated = identification.summary, ""
    if "estimated_flag_precision" in summary:  # what the identification says of its flags without the truth
        low, high = summary["estimated_flag_precision_interval"]
        estimated = (f" (estimated {summary['estimated_flag_precision']:.3f} [{low:.3f}, {high:.3f}] by "
                     f"{summary['flag_precision_source']})")
    recall = corrupted[flagged].sum() / corrupted.sum()
    return f"{len(flagged)}, precision {precision:.3f}{estimated}, recall {recall:.3f}, AUROC of the score {score_auroc:.3f}"


def fresh_cache(run_dir: Path, config: RepairConfig, key: str) -> Path:
    """Where `fresh_weights` keeps a fresh model of `config` beside its run, `key` naming its seed, run and data."""
    scales = "-".join(f"{scale:g}" for scale in config.fresh_learning_rate_scales)
    return run_dir / f"fresh_{key}_lr{finetune_learning_rate(config):g}x{scales}_e{config.fresh_epochs:g}.pt"


def fresh_weights(model: torch.nn.Module, initial: dict[str, torch.Tensor], verified: datasets.Dataset,
                  config: RepairConfig, cache: Path) -> dict[str, torch.Tensor]:
    """auto's `fresh` on `verified`: the initial weights fine-tuned on it at each learning-rate scale, the run with
    the lowest inner held-out loss kept (`FreshBuilder._finetune`); cached in `cache`."""
    if cache.exists():
        return torch.load(cache)
    learning_rate, split = finetune_learning_rate(config), split_verified(model, verified, config)
    best_loss, best_state = float("inf"), None
    for scale in config.fresh_learning_rate_scales:
        load_weights(model, initial)
        scaled = dataclasses.replace(config, retention_learning_rate=learning_rate * scale)
        result = RetentionRepair(model, scaled, forward_fn=default_forward, collate_fn=None,
                                 compute_metrics=None).run_on_verified(verified, split, config.fresh_epochs)
        if result.scores_after["loss"] < best_loss:
            best_loss, best_state = result.scores_after["loss"], {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(best_state, cache)
    return best_state


def fresh_runs(model: torch.nn.Module, initial: dict[str, torch.Tensor], verified: datasets.Dataset, config: RepairConfig,
               run_dir: Path, seed: int, runs: int, key: str = "") -> list[dict[str, torch.Tensor]]:
    """`runs` fresh fine-tunes on `verified` at repair seeds seed + 1000 r, as auto's runs (cached; `key` names the
    verified subset: "" for all of it, "_fold{f}" for all but fold f)."""
    states = []
    for run_index in range(runs):
        run_config = dataclasses.replace(config, repair_seed=seed + 1000 * run_index)
        name = f"s{seed}" + (f"_r{run_index}" if run_index else "") + key  # run 0: the cache of one fresh model
        states.append(fresh_weights(model, initial, verified, run_config, fresh_cache(run_dir, run_config, name)))
    return states


def fold_freshes(model: torch.nn.Module, initial: dict[str, torch.Tensor], verified: datasets.Dataset,
                 config: RepairConfig, run_dir: Path, seed: int, runs: int) -> list[dict[str, torch.Tensor]]:
    """auto's fold models of fresh: per verified fold, the average of `runs` fresh fine-tunes on the other folds."""
    folds = stratified_folds(column_array(verified, "labels"), config.num_folds, seed)
    states = []
    for fold in range(config.num_folds):
        outside = verified.select(np.sort(np.concatenate([rows for f, rows in enumerate(folds) if f != fold])))
        states.append(average_weights(fresh_runs(model, initial, outside, config, run_dir, seed, runs, f"_fold{fold}"),
                                      latest=0))
    return states


def outside_reference(model: torch.nn.Module, initial: dict[str, torch.Tensor], args: argparse.Namespace,
                      noisy: regime_benchmark.NoisyRun, config: RepairConfig) -> dict[str, torch.Tensor]:
    """A model fine-tuned on clean reviews of the pool after the training set and the verified split (cached)."""
    sizes = regime_benchmark.FULL["text"]
    pool, _ = regime_benchmark.text_reviews(args.seed, sizes)
    start = sizes.train + sizes.verified
    if start + args.outside_size > len(pool):
        raise SystemExit(f"--outside-size: the pool has {len(pool) - start} reviews outside the task.")
    outside = regime_benchmark.encode_reviews(pool.select(range(start, start + args.outside_size)), args.max_length)
    key = f"_outside{args.outside_size}"
    if args.outside_fresh:
        return average_weights(fresh_runs(model, initial, outside, config, noisy.run_dir, args.seed, args.fresh_runs, key),
                               latest=0)
    recipe, output_dir = noisy.recipe, noisy.run_dir / f"outside{args.outside_size}_s{args.seed}"
    run = finetune(noisy.task.new_model(args.seed), outside, noisy.task.verified, output_dir, recipe.epochs, recipe.lr,
                   recipe.batch_size, args.seed)
    return load_checkpoint(noisy.task.model_class, run.final.path).state_dict()


def trajectory_identification(run: Trajectory, task: regime_benchmark.Task, config: RepairConfig) -> IdentificationResult:
    """Samples ranked by the mean probe score over every checkpoint; as many flagged as the first checkpoint flags."""
    results = [identify_harmful(load_checkpoint(task.model_class, c.path), task.noisy, task.verified, config)
               for c in run.checkpoints]
    mean_score = np.mean([column_array(r.table, "score") for r in results], axis=0)
    count = len(results[0].flagged_indices)
    corrupted = column_array(task.noisy, "is_corrupted").astype(bool)
    print("AUROC on the known corruption by epoch: " + ", ".join(
        f"{c.epoch}: {r.summary['auroc']:.3f} ({len(r.flagged_indices)} flagged)" for c, r in zip(run.checkpoints, results, strict=True)
    ) + f"; the mean score: {auroc(mean_score, corrupted):.3f}")
    return dataclasses.replace(results[-1], flagged_indices=np.sort(np.argsort(mean_score)[:count]))


if __name__ == "__main__":
    main()
