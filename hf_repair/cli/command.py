"""`hf-repair`: repair a saved classifier checkpoint with a verified split read from disk.

    hf-repair MODEL_DIR --verified PATH --output_dir OUT [repair options]
    accelerate launch --multi_gpu --num_processes N -m hf_repair.cli MODEL_DIR --verified PATH --output_dir OUT

MODEL_DIR is any sequence, image or audio classification checkpoint written by `save_pretrained`.
The verified split (hand-checked labels) is a `datasets.save_to_disk` directory, a
.csv/.tsv/.json/.jsonl/.parquet file, or an image folder with one sub-folder per class. Text is
tokenized with MODEL_DIR's tokenizer, images are prepared with its image processor.

OUT receives the repaired model (`save_pretrained`, with its tokenizer or image processor, and a
model card tagged `hf-repair`), the saved repair in OUT/repair (re-apply it to MODEL_DIR with
`RepairResult.from_pretrained`), `repair_results.json`, and the HTML report in
OUT/repair_report/index.html (with --test PATH it also scores that labelled data before and after,
per class). A short before/after table is printed at the end. OUT is built in a temporary directory
and renamed into place, so an interrupted run leaves no half-written OUT. Under `accelerate launch`
the verified split is sharded across processes and only the main process writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from huggingface_hub import ModelCard, ModelCardData
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..config import FINETUNE_METHODS, RepairConfig
from ..integrations.callback import REPORT_DIR, RESULTS_NAME, repair_results
from ..repairer import Repairer
from ..report.writer import REPORT_JSON, before_after_table
from ..results import RepairResult
from ..utils.files import atomic_directory, check_output_directory, read_json, write_json

logger = logging.getLogger(__name__)

REPAIR_SUBDIR = "repair"
TAG = "hf-repair"

_CLASSIFIER_MAPPINGS = {
    "AutoModelForSequenceClassification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForImageClassification": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForAudioClassification": MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
}
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
_USER_ERRORS = (ValueError, KeyError, OSError)


@dataclass
class CLIArguments:
    """Where the data comes from and where the repaired model goes (the repair itself is a RepairConfig)."""

    _argument_group_name = "input and output"

    output_dir: str = field(
        metadata={"help": "Where to write the repaired model, the saved repair, repair_results.json and the report."}
    )
    verified: Optional[str] = field(
        default=None,
        metadata={
            "help": "The verified split (required unless --repair_dir): a datasets.save_to_disk directory, a "
            ".csv/.tsv/.json/.jsonl/.parquet file, or an image folder (one sub-folder per class)."
        },
    )
    repair_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Re-apply a repair saved earlier (e.g. OUT/repair of a previous run on the same MODEL_DIR) "
            "instead of computing one; needs no verified split, and the repair options are taken from it."
        },
    )
    train: Optional[str] = field(
        default=None,
        metadata={
            "help": "The training data (same formats and columns as --verified), for the methods that fine-tune "
            "(--method projection+retention, retention, erase, projection+erase): its harmful samples are found "
            "and the model is fine-tuned briefly on it."
        },
    )
    train_split: Optional[str] = field(
        default=None, metadata={"help": "Split of --train to use when it has several (e.g. 'train')."}
    )
    test: Optional[str] = field(
        default=None,
        metadata={
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
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})
    log_level: str = field(
        default="info",
        metadata={"help": "Logging level of the main process.", "choices": ["debug", "info", "warning", "error"]},
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> HfArgumentParser:
    """Every RepairConfig field and every CLIArguments field as a flag, plus the positional MODEL_DIR."""
    parser = HfArgumentParser(
        (CLIArguments, RepairConfig),
        prog="hf-repair",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="The trained checkpoint (a save_pretrained directory).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `hf-repair` console script; exits with status 2 and a one-line reason on bad input."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    model_dir = namespace.model_dir
    try:
        cli_args, config = parser.parse_dict({k: v for k, v in vars(namespace).items() if k != "model_dir"})
        state = process_state(cli_args.use_cpu)
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("hf_repair").setLevel(cli_args.log_level.upper() if state.is_main_process else logging.WARNING)
        repair_checkpoint(model_dir, cli_args, config)
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
    if not fine_tunes and cli_args.train is not None:
        raise ValueError("--train is read by the fine-tuning methods only; drop it or pass e.g. --method projection+retention.")
    check_checkpoint(model_path)
    check_output(model_path, output_path, cli_args.overwrite)  # before the repair, not after it

    auto_class = resolve_auto_class(AutoConfig.from_pretrained(model_path), cli_args.auto_class)
    model = auto_class.from_pretrained(model_path).to(state.device).eval()
    preprocessor = load_preprocessor(model, model_path)

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
            if fine_tunes:
                train, _ = load_data(cli_args.train, cli_args.train_split, config, model, preprocessor, cli_args,
                                     name="train")
        result = Repairer(model, config, collate_fn=collate_fn).repair(verified, train_dataset=train)

    if state.is_main_process:
        source = {"model_dir": str(model_path.absolute())}
        for key in ("verified", "train", "repair_dir", "test"):
            if getattr(cli_args, key) is not None:
                source[key] = str(Path(getattr(cli_args, key)).absolute())
        with atomic_directory(output_path, overwrite=cli_args.overwrite) as staging:
            model.save_pretrained(staging)
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
            if not fine_tunes:  # a fine-tune changed every weight: the model written here is the repair
                result.save_pretrained(staging / REPAIR_SUBDIR)
            report, report_error = (None, None)
            if not cli_args.no_report:
                report, report_error = write_repair_report(result, staging, model, test, test_collate_fn)
            write_json(staging / RESULTS_NAME, repair_results(
                result, result.config, source, report=report, report_error=report_error,
            ))
            model_card(model_path, result, type(model).__name__).save(staging / "README.md")
        numbers = read_json(output_path / REPORT_DIR / REPORT_JSON) if report else {"metrics": result.metrics}
        print(format_table(result, numbers, type(model).__name__, output_path, report))
    state.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------------
# checks


def check_checkpoint(model_dir: Path) -> None:
    """A directory with config.json and weights, or a clear reason why not."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir} is not a directory; give a model saved with save_pretrained.")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"MODEL_DIR {model_dir} has no config.json; it is not a transformers checkpoint.")
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((model_dir / name).is_file() for name in names):
        raise ValueError(
            f"MODEL_DIR {model_dir} has a config.json but no weights (none of {list(names)}); save the trained "
            f"model with model.save_pretrained(dir) (or trainer.save_model(dir)), not only its config."
        )


def check_output(model_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is, or contains, the trained model, or a non-empty one without --overwrite."""
    model, output = model_dir.resolve(), output_dir.resolve()
    if output == model or output in model.parents:
        raise ValueError(
            f"--output_dir {output_dir} would overwrite the trained model in {model_dir}; choose another directory."
        )
    check_output_directory(output_dir, overwrite)


def resolve_auto_class(config: transformers.PretrainedConfig, auto_class: Optional[str] = None) -> Any:
    """The `AutoModelFor...Classification` class whose mapping holds the architecture in config.json."""
    if auto_class is not None:
        cls = getattr(transformers, auto_class, None)
        if cls is None or not auto_class.startswith("AutoModelFor"):
            raise ValueError(f"--auto_class {auto_class!r} is not a transformers AutoModelFor... class.")
        return cls
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        raise ValueError(
            "config.json names no `architectures`, so the model class is unknown; pass --auto_class, "
            "e.g. --auto_class AutoModelForSequenceClassification."
        )
    for name, mapping in _CLASSIFIER_MAPPINGS.items():
        known = mapping.get(config.model_type, ())
        known = (known,) if isinstance(known, str) else known
        if any(arch in known for arch in architectures):
            return getattr(transformers, name)
    raise ValueError(
        f"{architectures} is not a sequence, image or audio classifier: hf-repair repairs classifiers whose "
        f"logits are (batch, num_labels). If it is one, pass --auto_class to name its Auto class."
    )


# ------------------------------------------------------------------------------------------------
# the verified split


def load_data(
    path: str, split: Optional[str], config: RepairConfig, model: PreTrainedModel, preprocessor: Optional[Any],
    cli_args: CLIArguments, name: str = "verified",
) -> tuple[datasets.Dataset, Optional[Any]]:
    """The `--verified` (or `--test`) data read from disk, with model label ids and inputs, and its collate_fn."""
    dataset = load_verified(path, split, name)
    dataset = prepare_labels(dataset, config, model.config, name)
    return prepare_inputs(dataset, model, preprocessor, cli_args, name)


def load_verified(path: str, split: Optional[str] = None, name: str = "verified") -> datasets.Dataset:
    """A Dataset from a save_to_disk directory, a data file (by extension) or an image folder.

    `name` is the flag the data came from (`verified` or `test`), for error messages.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"--{name} {path} does not exist.")
    if source.is_dir():
        saved = any((source / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))
        data = datasets.load_from_disk(str(source)) if saved else datasets.load_dataset("imagefolder", data_dir=str(source))
    else:
        builder = _FILE_BUILDERS.get(source.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read --{name} {path}: give a datasets.save_to_disk directory, an image folder, or a "
                f"{'/'.join(sorted(_FILE_BUILDERS))} file."
            )
        options = {"delimiter": "\t"} if source.suffix.lower() == ".tsv" else {}
        data = datasets.load_dataset(builder, data_files=str(source), **options)
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            split_flag = "--split" if name == "verified" else f"--{name}_split"
            raise ValueError(f"--{name} {path} has the splits {list(data)}; choose one with {split_flag}.")
        data = data[split]
    return data


def prepare_labels(dataset: datasets.Dataset, config: RepairConfig, model_config: transformers.PretrainedConfig,
                   name: str = "verified") -> datasets.Dataset:
    """Find the label column and turn class names into the model's label ids (model.config.label2id)."""
    column = config.label_column
    if column not in dataset.column_names:
        if column == "labels" and "label" in dataset.column_names:
            dataset = dataset.rename_column("label", "labels")
        else:
            raise ValueError(
                f"The {name} split has no label column {column!r} (columns: {dataset.column_names}); "
                f"name it with --label_column."
            )
    feature = dataset.features[column]
    label2id = dict(getattr(model_config, "label2id", None) or {})
    named = bool(label2id) and not all(name == f"LABEL_{i}" for name, i in label2id.items())
    if isinstance(feature, datasets.ClassLabel):
        if named and set(feature.names) <= set(label2id):
            mapping = [label2id[name] for name in feature.names]
            if mapping != list(range(len(mapping))):
                logger.info("Mapping the %s class names to the model's label ids: %s", name,
                            dict(zip(feature.names, mapping)))
                return _map_labels(dataset, column, lambda i: mapping[i])
        elif named:
            logger.warning(
                "The %s class names %s are not the model's labels %s; using the class indices as label ids.",
                name, feature.names, sorted(label2id),
            )
        return dataset
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        unknown = sorted(set(dataset[column]) - set(label2id))
        if unknown:
            raise ValueError(
                f"{name.capitalize()} labels {unknown[:10]} are not among the model's labels {sorted(label2id)} "
                f"(model.config.label2id); fix the labels or use integer label ids."
            )
        return _map_labels(dataset, column, lambda name: label2id[name])
    return dataset


def _map_labels(dataset: datasets.Dataset, column: str, to_id: Any) -> datasets.Dataset:
    features = dataset.features.copy()
    features[column] = datasets.Value("int64")
    return dataset.map(
        lambda batch: {column: [to_id(label) for label in batch[column]]},
        batched=True, features=features, keep_in_memory=True, desc="hf-repair: labels",
    )


def load_preprocessor(model: PreTrainedModel, model_dir: Path) -> Optional[Any]:
    """MODEL_DIR's tokenizer (text models) or image processor (image models), or None if it has none."""
    if model.main_input_name == "input_ids":
        # AutoTokenizer builds an empty tokenizer from config.json alone; only trust saved tokenizer files.
        if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(model_dir)
    if model.main_input_name == "pixel_values" and (model_dir / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(model_dir)
    return None


def prepare_inputs(
    dataset: datasets.Dataset, model: PreTrainedModel, preprocessor: Optional[Any], cli_args: CLIArguments,
    name: str = "verified",
) -> tuple[datasets.Dataset, Optional[Any]]:
    """The --verified (or --test) split with the model's inputs (tokenized or processed), and its collate_fn."""
    columns = dataset.column_names
    main_input = model.main_input_name
    if main_input in columns:
        collate_fn = DataCollatorWithPadding(preprocessor) if main_input == "input_ids" and preprocessor else None
        return (dataset if collate_fn else dataset.with_format("torch")), collate_fn
    what = {"input_ids": ("text", "tokenizer"), "pixel_values": ("images", "image processor")}.get(main_input)
    if what is None:
        raise ValueError(
            f"{type(model).__name__} takes {main_input!r}, which hf-repair cannot compute from the {name} columns "
            f"{columns}; preprocess the split into a {main_input!r} column first."
        )
    if preprocessor is None:
        raise ValueError(
            f"{type(model).__name__} reads {what[0]}, but MODEL_DIR has no {what[1]} to prepare them: save it next "
            f"to the model ({what[1].replace(' ', '_')}.save_pretrained(MODEL_DIR)) or give {main_input!r} in the split."
        )
    if main_input == "input_ids":
        return _tokenize(dataset, preprocessor, model, cli_args, name), DataCollatorWithPadding(preprocessor)
    return _process_images(dataset, preprocessor, model, cli_args.image_column, name).with_format("torch"), None


def _tokenize(dataset: datasets.Dataset, tokenizer: Any, model: PreTrainedModel, cli_args: CLIArguments,
              name: str) -> datasets.Dataset:
    text_columns = [c for c in (cli_args.text_column, cli_args.text_pair_column) if c is not None]
    missing = [c for c in text_columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{type(model).__name__} reads text, but the {name} split has no column {missing[0]!r} "
            f"(columns: {dataset.column_names}); name the text column with --text_column, or give tokenized input_ids."
        )
    for column in text_columns:
        if getattr(dataset.features[column], "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"{name.capitalize()} column {column!r} holds {dataset.features[column]}, not text.")
    max_length = cli_args.max_length or min(
        tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    )

    def tokenize(batch: dict[str, list]) -> Any:
        pairs = batch[cli_args.text_pair_column] if cli_args.text_pair_column else None
        return tokenizer(batch[cli_args.text_column], pairs, truncation=True, max_length=max_length)

    return dataset.map(tokenize, batched=True, remove_columns=text_columns, keep_in_memory=True,
                       desc="hf-repair: tokenize")


def _process_images(dataset: datasets.Dataset, processor: Any, model: PreTrainedModel, column: str,
                    name: str) -> datasets.Dataset:
    if column not in dataset.column_names or not isinstance(dataset.features[column], datasets.Image):
        raise ValueError(
            f"{type(model).__name__} reads images, but the {name} split has no image column {column!r} "
            f"(columns: {dataset.column_names}); name it with --image_column, or give pixel_values."
        )
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    def process(batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert(mode) for image in batch[column]]
        return {"pixel_values": processor(images=images, return_tensors="np")["pixel_values"]}

    return dataset.map(process, batched=True, batch_size=64, remove_columns=[column], keep_in_memory=True,
                       desc="hf-repair: images")


# ------------------------------------------------------------------------------------------------
# outputs


def model_card(model_dir: Path, result: RepairResult, model_name: str) -> ModelCard:
    """MODEL_DIR's model card (or a new one) with the `hf-repair` tag and a section on the repair."""
    readme = model_dir / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme, ignore_metadata_errors=True)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n\n# {model_dir.name}\n")
    tags = list(card.data.tags or [])
    card.data.tags = tags + [TAG] if TAG not in tags else tags
    m = result.metrics
    projection = result.config.method == "projection"
    if not projection:
        outcome = (
            f"{m['num_flagged']} of {m['num_train']} training samples were flagged as harmful and the model was "
            f"fine-tuned for {m['steps']} steps; the repair was "
            + ("adopted." if result.adopted else "not adopted (nothing beat the trained model), so the weights are unchanged.")
        )
    elif result.adopted:
        outcome = (
            f"The repair was adopted: {m['num_layers']} layers ({m['num_clean_spaces']} clean spaces) were projected "
            f"with alpha = {m['alpha']:g}."
        )
    else:
        outcome = "No projection beat the unrepaired model on held-out verified samples, so the weights are unchanged."
    saved = (
        f"\nThe saved repair is in `{REPAIR_SUBDIR}/`: `RepairResult.from_pretrained(\"{REPAIR_SUBDIR}\").apply_to(model)`\n"
        f"re-creates these weights from the original checkpoint, and `.undo()` on its result reverts them.\n"
        if projection else ""
    )
    card.text = card.text.rstrip() + f"""

## Repaired with hf_repair

This {model_name} was repaired with hf_repair ({result.config.method}) using {m['num_verified']} verified
samples. {outcome}

| held-out verified accuracy | before | after |
|---|---|---|
| {result.config.method} | {m['accuracy_before']:.4f} | {m['accuracy_after']:.4f} |
{saved}"""
    return card


def write_repair_report(
    result: RepairResult, directory: Path, model: PreTrainedModel, test: Optional[datasets.Dataset],
    collate_fn: Optional[Any],
) -> tuple[Optional[str], Optional[str]]:
    """Write the report into `directory/repair_report`: its index.html relative to `directory`, or None and why not.

    Best effort: the repaired model is what the run is for, so a report that fails is logged and left
    out rather than costing the model.
    """
    try:
        page = result.report(directory / REPORT_DIR, model=model, test_dataset=test, collate_fn=collate_fn)
    except Exception as err:
        logger.exception("Could not write the repair report; writing the repaired model without it.")
        return None, f"{type(err).__name__}: {err}"
    return os.path.relpath(page, directory), None


def format_table(result: RepairResult, numbers: dict[str, Any], model_name: str, output_dir: Path,
                 report: Optional[str] = None) -> str:
    """The short summary printed at the end of a run, around the report's before/after table.

    `numbers` is the report's `report.json`, or at least `{"metrics": result.metrics}`.
    """
    m = result.metrics
    if result.config.method == "projection":
        what = f"{m['num_layers']} layers in {m['num_clean_spaces']} clean spaces"
    else:
        what = f"{result.config.method}, {m['num_flagged']} of {m['num_train']} training samples flagged, {m['steps']} steps"
    lines = [
        f"hf-repair: {model_name}, {m['num_verified']} verified samples, {what}, {m['repair_time_s']:.1f}s",
        before_after_table(numbers),
    ]
    metric = result.config.metric_for_selection
    if metric != "accuracy":
        lines.append(f"held-out {metric}: {m[f'{metric}_before']:.4f} -> {m[f'{metric}_after']:.4f}")
    alpha = "none" if m.get("alpha") is None else f"{m['alpha']:g}"
    lines.append(f"alpha: {alpha}; adopted: {'yes' if result.adopted else 'no (weights unchanged)'}")
    lines.append(f"written to {output_dir}" + (f"; report: {output_dir / report}" if report else ""))
    return "\n".join(lines)


