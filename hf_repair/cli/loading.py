"""Reading what `hf-repair` is given: the checkpoint with its tokenizer or image processor, and labelled data.

Data comes from a `datasets.save_to_disk` directory, a .csv/.tsv/.json/.jsonl/.parquet file or an
image folder; its labels become the model's label ids and its text or images the model's inputs.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..config import RepairConfig
from ..modeling.lora import ADAPTER_WEIGHTS_NAMES, is_adapter_checkpoint
from ..utils.files import read_json
from .arguments import CLIArguments

logger = logging.getLogger(__name__)

_CLASSIFIER_MAPPINGS = {
    "AutoModelForSequenceClassification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForImageClassification": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForAudioClassification": MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
}
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's name, kept here so that peft stays optional
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


# ------------------------------------------------------------------------------------------------
# the checkpoint


def load_checkpoint(model_dir: Path, auto_class: str | None, device: torch.device,
                    base_model: str | None = None) -> tuple[PreTrainedModel, Any | None]:
    """MODEL_DIR's classifier (in eval mode, on `device`) and its tokenizer or image processor (or None).

    A peft adapter directory is loaded onto its base checkpoint as a `PeftModel` whose adapter is trainable
    (the fine-tuning methods train it, and only it).
    """
    if not is_adapter_dir(model_dir):
        model_class = resolve_auto_class(AutoConfig.from_pretrained(model_dir), auto_class)
        model = model_class.from_pretrained(model_dir).to(device).eval()
        return model, load_preprocessor(model, model_dir)
    from peft import PeftModel

    base_dir = adapter_base(model_dir, base_model)
    base = resolve_auto_class(AutoConfig.from_pretrained(base_dir), auto_class).from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, model_dir, is_trainable=True).to(device).eval()
    return model, load_preprocessor(model, model_dir) or load_preprocessor(model, base_dir)


def is_adapter_dir(model_dir: Path) -> bool:
    """Whether MODEL_DIR is a peft adapter (`adapter_config.json`) rather than a whole model."""
    return (model_dir / ADAPTER_CONFIG_NAME).is_file()


def adapter_base(model_dir: Path, base_model: str | None) -> Path:
    """The base checkpoint of an adapter directory: --base_model, else the adapter config's base_model_name_or_path."""
    if base_model is None:
        base_model = read_json(model_dir / ADAPTER_CONFIG_NAME).get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"{model_dir / ADAPTER_CONFIG_NAME} names no base_model_name_or_path; give the base "
                             f"model's directory with --base_model DIR.")
    base_dir = Path(base_model)
    if not base_dir.is_dir():
        raise ValueError(
            f"The adapter's base model {base_model!r} is not a local directory; hf-repair reads local checkpoints "
            f"only. Save the base classifier (the model get_peft_model wrapped) with save_pretrained and give it "
            f"with --base_model DIR."
        )
    return base_dir


def check_checkpoint(model_dir: Path, base_model: str | None = None) -> None:
    """A directory with config.json and weights (or a peft adapter and its base checkpoint), or why not."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir} is not a directory; give a model saved with save_pretrained.")
    if is_adapter_dir(model_dir):
        if importlib.util.find_spec("peft") is None:
            raise ValueError(f"MODEL_DIR {model_dir} is a peft adapter, and peft is not installed: "
                             f"pip install 'hf_repair[peft]'.")
        if not is_adapter_checkpoint(model_dir):
            raise ValueError(f"MODEL_DIR {model_dir} has an {ADAPTER_CONFIG_NAME} but no adapter weights (none of "
                             f"{list(ADAPTER_WEIGHTS_NAMES)}); save it with model.save_pretrained(dir).")
        check_checkpoint(adapter_base(model_dir, base_model))
        return
    if base_model is not None:
        raise ValueError(f"--base_model is for a peft adapter MODEL_DIR; {model_dir} has no {ADAPTER_CONFIG_NAME}.")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"MODEL_DIR {model_dir} has no config.json; it is not a transformers checkpoint.")
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((model_dir / name).is_file() for name in names):
        raise ValueError(
            f"MODEL_DIR {model_dir} has a config.json but no weights (none of {list(names)}); save the trained "
            f"model with model.save_pretrained(dir) (or trainer.save_model(dir)), not only its config."
        )


def resolve_auto_class(config: transformers.PretrainedConfig, auto_class: str | None = None) -> Any:
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


def load_preprocessor(model: PreTrainedModel, model_dir: Path) -> Any | None:
    """MODEL_DIR's tokenizer (text models) or image processor (image models), or None if it has none."""
    if model.main_input_name == "input_ids":
        # AutoTokenizer builds an empty tokenizer from config.json alone; only trust saved tokenizer files.
        if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(model_dir)
    if model.main_input_name == "pixel_values" and (model_dir / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(model_dir)
    return None


# ------------------------------------------------------------------------------------------------
# labelled data


def load_data(
    path: str, split: str | None, config: RepairConfig, model: PreTrainedModel, preprocessor: Any | None,
    cli_args: CLIArguments, name: str = "verified",
) -> tuple[datasets.Dataset, Any | None]:
    """The `--verified` (or `--test`) data read from disk, with model label ids and inputs, and its collate_fn."""
    dataset = load_verified(path, split, name)
    dataset = prepare_labels(dataset, config, model.config, name)
    return prepare_inputs(dataset, model, preprocessor, cli_args, name)


def load_verified(path: str, split: str | None = None, name: str = "verified") -> datasets.Dataset:
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
                            dict(zip(feature.names, mapping, strict=True)))
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


def prepare_inputs(
    dataset: datasets.Dataset, model: PreTrainedModel, preprocessor: Any | None, cli_args: CLIArguments,
    name: str = "verified",
) -> tuple[datasets.Dataset, Any | None]:
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
        check_text_cells(dataset, column, name)
    max_length = cli_args.max_length or min(
        tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    )

    def tokenize(batch: dict[str, list]) -> Any:
        pairs = batch[cli_args.text_pair_column] if cli_args.text_pair_column else None
        return tokenizer(batch[cli_args.text_column], pairs, truncation=True, max_length=max_length)

    return dataset.map(tokenize, batched=True, remove_columns=text_columns, keep_in_memory=True,
                       desc="hf-repair: tokenize")


def check_text_cells(dataset: datasets.Dataset, column: str, name: str = "verified", shown: int = 5) -> None:
    """Every cell of `column` a non-empty string, or an error naming the rows (the tokenizer fails on None).

    An empty CSV cell arrives as None, a column of numbers as floats, mixed JSON values as they are.
    """
    values = dataset[column]
    empty = [i for i, value in enumerate(values) if not isinstance(value, str) or not value.strip()]
    if empty:
        rows = ", ".join(map(str, empty[:shown])) + (", ..." if len(empty) > shown else "")
        raise ValueError(
            f"{name.capitalize()} column {column!r} has no text in {len(empty)} of {len(values)} rows "
            f"(0-based rows {rows}; row {empty[0]} holds {values[empty[0]]!r}): every row needs a non-empty string. "
            f"Fill in those cells or drop their rows, then run again."
        )


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
