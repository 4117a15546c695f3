"""The `hf-repair` command line: `CLIArguments` (where data comes from, where the model goes) and the parser.

The parser leads with what every run needs (MODEL_DIR, --verified, --output_dir), then gives one
argument group per repair phase (`hf_repair.config.ARGUMENT_GROUPS`), whose values make up the
`RepairConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from ..config import ARGUMENT_GROUPS, RepairConfig
from ..integrations.callback import REPORT_DIR

USAGE = """%(prog)s MODEL_DIR --verified PATH --output_dir OUT [options]
       %(prog)s MODEL_DIR --repair_dir DIR --output_dir OUT [options]"""

DESCRIPTION = """Repair a saved classifier checkpoint with a verified split (hand-checked labels) read from disk.

  MODEL_DIR          a sequence, image or audio classification checkpoint written by save_pretrained,
                     or a peft LoRA adapter directory (adapter_config.json; see --base_model)
  --verified PATH    a datasets.save_to_disk directory, a .csv/.tsv/.json/.jsonl/.parquet file, or an
                     image folder with one sub-folder per class; text is tokenized with MODEL_DIR's
                     tokenizer, images are prepared with its image processor
  --output_dir OUT   where the repaired model, the saved repair and the report go

Every other option has a default; the repair options come in one group per phase."""

EPILOG = """OUT receives the repaired model (save_pretrained, with its tokenizer or image processor, and a
model card tagged hf-repair; for an adapter MODEL_DIR the repaired adapter, or the merged model if the repair
changed base weights the adapter does not hold), the saved repair in OUT/repair (re-apply it to MODEL_DIR with
RepairResult.from_pretrained or --repair_dir), repair_results.json, and the HTML report in
OUT/repair_report/index.html (with --test PATH it also scores that labelled data before and after,
per class). A short before/after table is printed at the end. OUT is built in a temporary directory
and renamed into place, so an interrupted run leaves no half-written OUT.

On several GPUs the verified split is sharded across processes and only the main process writes:
    accelerate launch --multi_gpu --num_processes N -m hf_repair.cli MODEL_DIR --verified PATH --output_dir OUT"""


@dataclass
class CLIArguments:
    """Where the data comes from and where the repaired model goes (the repair itself is a RepairConfig)."""

    _argument_group_name = "input and output"

    output_dir: str = field(
        metadata={
            "metavar": "OUT",
            "help": "Where to write the repaired model, the saved repair, repair_results.json and the report.",
        }
    )
    verified: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "PATH",
            "help": "The verified split (required unless --repair_dir): a datasets.save_to_disk directory, a "
            ".csv/.tsv/.json/.jsonl/.parquet file, or an image folder (one sub-folder per class)."
        },
    )
    repair_dir: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "Re-apply a repair saved earlier (e.g. OUT/repair of a previous run on the same MODEL_DIR) "
            "instead of computing one; needs no verified split, and the repair options are taken from it."
        },
    )
    train: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "PATH",
            "help": "The training data (same formats and columns as --verified), for the methods that fine-tune "
            "(--method projection+retention, retention, erase, projection+erase; with --method auto, its erase "
            "refinement): its harmful samples are found and the model is fine-tuned briefly on it."
        },
    )
    train_split: Optional[str] = field(
        default=None, metadata={"help": "Split of --train to use when it has several (e.g. 'train')."}
    )
    checkpoints: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "With --method auto: the Trainer output_dir whose checkpoint-* folders hold the training "
            "trajectory of MODEL_DIR (the final weights); the best point, weight averages and soups of them (and a "
            "fresh fine-tune with --initial_weights), and head refit / projection / erase / retrain on top, are "
            "chosen by held-out verified folds.",
        },
    )
    initial_weights: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "With --method auto: a checkpoint folder with the weights training started from (e.g. the "
            "pretrained model with its new head, saved before training), for the fresh procedure (fine-tune them "
            "on the verified samples alone) and, with --train, the retrain refinement (fine-tune them again "
            "without the training samples flagged as harmful).",
        },
    )
    test: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "PATH",
            "help": "Labelled test data (same formats and columns as --verified) that the report scores before "
            "and after the repair: accuracy per class and confusion matrices."
        },
    )
    test_split: Optional[str] = field(
        default=None, metadata={"help": "Split of --test to use when it has several (e.g. 'test')."}
    )
    no_report: bool = field(
        default=False, metadata={"help": f"Do not write the HTML report ({REPORT_DIR}/ in output_dir)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir if it exists and is not empty."})
    split: Optional[str] = field(
        default=None, metadata={"help": "Split to use when the verified data has several (e.g. 'validation')."}
    )
    text_column: str = field(default="text", metadata={"help": "Column of the texts, for text classifiers."})
    text_pair_column: Optional[str] = field(
        default=None, metadata={"help": "Column of the second texts, for sentence-pair classifiers."}
    )
    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "Truncate texts to this many tokens (default: what the tokenizer and model allow)."},
    )
    image_column: str = field(default="image", metadata={"help": "Column of the images, for image classifiers."})
    auto_class: Optional[str] = field(
        default=None,
        metadata={
            "help": "transformers Auto class to load MODEL_DIR with (default: chosen from config.architectures, "
            "e.g. AutoModelForSequenceClassification)."
        },
    )
    base_model: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "When MODEL_DIR is a peft adapter (adapter_config.json): the base classifier checkpoint to load it "
            "onto (default: the adapter config's base_model_name_or_path, which must be a local directory).",
        },
    )
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})
    log_level: str = field(
        default="info",
        metadata={"help": "Logging level of the main process.", "choices": ["debug", "info", "warning", "error"]},
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default only where it tells something: not None, not an off switch, not said in the help."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        help_text = action.help or ""
        silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if silent or not action.option_strings or "default" in help_text.lower():
            return help_text
        return help_text + " (default: %(default)s)"


def build_parser() -> HfArgumentParser:
    """MODEL_DIR, the CLIArguments, then one group of flags per repair phase."""
    parser = HfArgumentParser(
        (CLIArguments, *ARGUMENT_GROUPS),
        prog="hf-repair",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="The trained checkpoint (a save_pretrained directory).")
    return parser


def parse_arguments(parser: HfArgumentParser, namespace: argparse.Namespace) -> tuple[CLIArguments, RepairConfig]:
    """The CLIArguments and the RepairConfig its phase groups make up; a bad repair option raises ValueError."""
    cli_args, *groups = parser.parse_dict({k: v for k, v in vars(namespace).items() if k != "model_dir"})
    # RepairConfig inherits every group's fields, and validates them all together.
    return cli_args, RepairConfig(**{f.name: getattr(g, f.name) for g in groups for f in dataclasses.fields(g)})
