"""`hf-repair`: load a checkpoint and data, repair (or re-apply a saved repair), and write OUT.

    hf-repair MODEL_DIR --verified PATH --output_dir OUT [options]

See `hf-repair --help` (`arguments.py`) for what OUT receives. Under `accelerate launch` the
verified split is sharded across processes and only the main process writes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from transformers import PreTrainedModel

from ..config import FINETUNE_METHODS, RepairConfig
from ..integrations.callback import REPORT_DIR, RESULTS_NAME, repair_results
from ..repairer import Repairer
from ..report.summary import estimated_precision_lines
from ..report.writer import REPORT_JSON, before_after_table, write_report
from ..results import RepairResult
from ..utils.files import atomic_directory, check_output_directory, read_json, write_json
from .arguments import CLIArguments, build_parser, parse_arguments
from .loading import check_checkpoint, load_checkpoint, load_data
from .model_card import REPAIR_SUBDIR, model_card

logger = logging.getLogger(__name__)

_USER_ERRORS = (ValueError, KeyError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-repair` console script; exits with status 2 and a one-line reason on bad input."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        cli_args, config = parse_arguments(parser, namespace)
        state = process_state(cli_args.use_cpu)
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("hf_repair").setLevel(cli_args.log_level.upper() if state.is_main_process else logging.WARNING)
        repair_checkpoint(namespace.model_dir, cli_args, config)
        state.destroy_process_group()  # under accelerate launch: leave the group (together) before interpreter shutdown
    except _USER_ERRORS as err:
        logger.debug("hf-repair failed", exc_info=True)
        parser.exit(2, f"hf-repair: error: {err}\n")
    return 0


def process_state(use_cpu: bool = False) -> PartialState:
    """Accelerate's process state; on a machine without GPUs, `accelerate launch` processes join over gloo.

    (`PartialState()` alone treats CPU processes started by `accelerate launch` as independent runs.)
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)


def repair_checkpoint(model_dir: str, cli_args: CLIArguments, config: RepairConfig) -> RepairResult:
    """Load, repair (or re-apply a saved repair), and on the main process write OUT; returns the result."""
    state = process_state(cli_args.use_cpu)
    model_path, output_path = Path(model_dir), Path(cli_args.output_dir)
    if (cli_args.verified is None) == (cli_args.repair_dir is None):
        raise ValueError("Give exactly one of --verified PATH (to compute a repair) and --repair_dir PATH (to re-apply one).")
    if cli_args.test is not None and cli_args.no_report:
        raise ValueError("--test is only scored for the report; drop --test or --no_report.")
    fine_tunes = config.method in FINETUNE_METHODS
    if fine_tunes and cli_args.train is None:
        raise ValueError(f"--method {config.method} fine-tunes on the training data: give it with --train PATH.")
    if fine_tunes and cli_args.repair_dir is not None:
        raise ValueError("--repair_dir re-applies a saved projection; it cannot be combined with a fine-tuning --method.")
    for flag in ("checkpoints", "initial_weights"):
        if getattr(cli_args, flag) is not None and config.method != "auto":
            raise ValueError(f"--{flag} is read by --method auto only; drop it or pass --method auto.")
    if not fine_tunes and config.method != "auto" and cli_args.train is not None:
        raise ValueError("--train is read by the fine-tuning methods and auto only; drop it or pass e.g. --method "
                         "projection+retention.")
    if cli_args.initial_weights is not None and not Path(cli_args.initial_weights).is_dir():
        raise ValueError(f"--initial_weights {cli_args.initial_weights} is not a checkpoint folder; give the folder "
                         f"the model was saved to before training (model.save_pretrained(DIR)).")
    check_checkpoint(model_path, cli_args.base_model)
    check_output(model_path, output_path, cli_args.overwrite)  # before the repair, not after it

    model, preprocessor = load_checkpoint(model_path, cli_args.auto_class, state.device, cli_args.base_model)

    test, test_collate_fn = None, None
    if cli_args.test is not None and state.is_main_process:  # read before the repair: bad data fails early
        test, test_collate_fn = load_data(
            cli_args.test, cli_args.test_split, config, model, preprocessor, cli_args, name="test"
        )
    if cli_args.repair_dir is not None:
        result = RepairResult.from_pretrained(cli_args.repair_dir).apply_to(model)
    else:
        train = None
        with state.main_process_first():  # the first process fills the datasets cache, the others read it
            verified, collate_fn = load_data(cli_args.verified, cli_args.split, config, model, preprocessor, cli_args)
            if cli_args.train is not None:  # a fine-tuning method, or auto's erase refinement
                train, _ = load_data(cli_args.train, cli_args.train_split, config, model, preprocessor, cli_args,
                                     name="train")
        result = Repairer(model, config, collate_fn=collate_fn).repair(
            verified, train_dataset=train, checkpoints=cli_args.checkpoints, initial_weights=cli_args.initial_weights)

    if state.is_main_process:
        source = {"model_dir": str(model_path.absolute())}
        for key in ("base_model", "verified", "train", "checkpoints", "initial_weights", "repair_dir", "test"):
            if getattr(cli_args, key) is not None:
                source[key] = str(Path(getattr(cli_args, key)).absolute())
        with atomic_directory(output_path, overwrite=cli_args.overwrite) as staging:
            save_model(model, result, staging)
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
            if result.config.method == "projection":  # other methods change weights beyond clean spaces:
                result.save_pretrained(staging / REPAIR_SUBDIR)  # the model written here is the repair
            report, report_error = (None, None)
            if not cli_args.no_report:
                report, report_error = write_repair_report(result, staging, model, test, test_collate_fn)
            write_json(staging / RESULTS_NAME, repair_results(
                result, result.config, source, report=report, report_error=report_error,
            ))
            model_card(model_path, result, type(model).__name__).save(staging / "README.md")
        logger.info("Wrote the repaired model%s to %s", " and its report" if report else "", output_path)
        numbers = read_json(output_path / REPORT_DIR / REPORT_JSON) if report else {"metrics": result.metrics}
        print(format_table(result, numbers, type(model).__name__, output_path, report))
    state.wait_for_everyone()
    return result


def save_model(model: PreTrainedModel, result: RepairResult, directory: Path) -> None:
    """`save_pretrained` of the repaired model: a peft adapter stays an adapter unless the repair changed base weights.

    `Repairer` sets `metrics["peft_adapter_saveable"]` for a PeftModel; when it is False the adapter alone
    would lose part of the repair, so the merged model (base weights plus adapter) is written instead.
    """
    if result.metrics.get("peft_adapter_saveable") is False:
        logger.warning("The repair changed base weights that the adapter does not hold: writing the merged model "
                       "(a full checkpoint, loadable without peft) instead of an adapter.")
        model.merge_and_unload().save_pretrained(directory)
        return
    model.save_pretrained(directory)


def check_output(model_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is, or contains, the trained model, or a non-empty one without --overwrite."""
    model, output = model_dir.resolve(), output_dir.resolve()
    if output == model or output in model.parents:
        raise ValueError(
            f"--output_dir {output_dir} would overwrite the trained model in {model_dir}; choose another directory."
        )
    check_output_directory(output_dir, overwrite)


def write_repair_report(
    result: RepairResult, directory: Path, model: PreTrainedModel, test: datasets.Dataset | None,
    collate_fn: Any | None,
) -> tuple[str | None, str | None]:
    """Write the report into `directory/repair_report`: its index.html relative to `directory`, or None and why not.

    Best effort: the repaired model is what the run is for, so a report that fails is logged and left
    out rather than costing the model.
    """
    try:
        page = write_report(result, directory / REPORT_DIR, model=model, test_dataset=test, collate_fn=collate_fn)
    except Exception as err:
        logger.exception("Could not write the repair report; writing the repaired model without it.")
        return None, f"{type(err).__name__}: {err}"
    return os.path.relpath(page, directory), None


def format_table(result: RepairResult, numbers: dict[str, Any], model_name: str, output_dir: Path,
                 report: str | None = None) -> str:
    """The short summary printed at the end of a run, around the report's before/after table.

    `numbers` is the report's `report.json`, or at least `{"metrics": result.metrics}`.
    """
    m = result.metrics
    if result.config.method == "projection":
        what = f"{m['num_layers']} layers in {m['num_clean_spaces']} clean spaces"
    elif "num_flagged" in m:  # the fine-tuning methods
        what = f"{result.config.method}, {m['num_flagged']} of {m['num_train']} training samples flagged, {m['steps']} steps"
    else:
        what = result.config.method + (f", chosen: {m['chosen']}" if m.get("chosen") else "")
        if m.get("fresh_identification"):  # a refinement of fresh was refitted on the samples fresh flagged
            fresh = m["fresh_identification"]
            what += f" (fresh flagged {fresh['num_flagged']} of {fresh['num_samples']} training samples)"
    lines = [f"hf-repair: {model_name}, {m['num_verified']} verified samples, {what}, {m['repair_time_s']:.1f}s"]
    # how many of the flags are likely wrong labels: the sign, on a low figure, to verify more labels
    lines += estimated_precision_lines(m, "identification_") + estimated_precision_lines(m.get("fresh_identification") or {})
    lines.append(before_after_table(numbers))
    metric = result.config.metric_for_selection
    if metric != "accuracy":
        lines.append(f"held-out {metric}: {m[f'{metric}_before']:.4f} -> {m[f'{metric}_after']:.4f}")
    alpha = "none" if m.get("alpha") is None else f"{m['alpha']:g}"
    lines.append(f"alpha: {alpha}; adopted: {'yes' if result.adopted else 'no (weights unchanged)'}")
    lines.append(f"written to {output_dir}" + (f"; report: {output_dir / report}" if report else ""))
    return "\n".join(lines)
