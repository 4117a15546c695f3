"""The fine-tuning regime and its free baselines: a pretrained backbone, `Trainer` trajectories, and what
a user could do with them before reaching for a repair.

Most users fine-tune a pretrained model on their noisy labels (method.md, "The fine-tuning regime").
No pretrained image model installs offline, so `pretrained_vit` pretrains a small ViT here on clean
images of some classes and caches it. `finetune` trains with `transformers.Trainer`, scoring every
epoch on the verified split and keeping every epoch's checkpoint, so the baselines read the whole
trajectory afterwards without retraining:

- early stopping: `Trajectory.best` (what `load_best_model_at_end` gives);
- checkpoint averaging: `average_checkpoints` over the best epochs by verified accuracy;
- head refit: `refit_head`, a regularised softmax regression on the features the head reads, its L2
  strength chosen by k-fold on the verified split.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    EvalPrediction,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
)

from hf_repair.data import BOOKKEEPING_COLUMNS, column_array, model_input_names, stratified_folds
from testbed.experiments import small_vit, train_classifier
from testbed.offline_data import FASHION_MNIST_LABELS, load_fashion_mnist

logger = logging.getLogger(__name__)

TRAJECTORY_NAME = "trajectory.json"  # written once a `finetune` run has finished; its presence marks the cache valid


def image_dataset(pixel_values: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> datasets.Dataset:
    """Wrap float32 (n, C, H, W) images and class ids as a torch-formatted dataset with an `Array3D` column.

    Built from a flat Arrow buffer: `datasets.Dataset.select(...).flatten_indices()` would turn the
    `Array3D` column into nested lists, many times slower to batch.
    """
    features = datasets.Features({
        "pixel_values": datasets.Array3D(shape=pixel_values.shape[1:], dtype="float32"),
        "labels": datasets.ClassLabel(names=list(names)),
    })
    nested = pa.array(np.ascontiguousarray(pixel_values, dtype=np.float32).reshape(-1))
    for size in reversed(pixel_values.shape[1:]):
        nested = pa.FixedSizeListArray.from_arrays(nested, size)
    dataset = datasets.Dataset.from_dict({"pixel_values": nested, "labels": np.asarray(labels, dtype=np.int64)},
                                         features=features)
    return dataset.with_format("torch")


def fashion_mnist_classes(split: str, classes: Sequence[int]) -> datasets.Dataset:
    """The Fashion-MNIST `split` restricted to `classes`, relabelled 0..len(classes)-1 (in the given order)."""
    columns = load_fashion_mnist(split).with_format("numpy")[:]
    keep = np.isin(columns["labels"], classes)
    remap = {c: i for i, c in enumerate(classes)}
    labels = np.array([remap[int(c)] for c in columns["labels"][keep]], dtype=np.int64)
    return image_dataset(columns["pixel_values"][keep], labels, [FASHION_MNIST_LABELS[c] for c in classes])


def pretrained_vit(cache_dir: str | os.PathLike, classes: Sequence[int] = (0, 1, 2, 3, 4), epochs: int = 15,
                   lr: float = 1e-3, batch_size: int = 128, num_images: int | None = None, seed: int = 0,
                   **vit_kwargs: Any) -> Path:
    """Folder of a small ViT backbone pretrained on clean Fashion-MNIST `classes` (cached by its settings).

    Only the backbone (`ViTModel`) is saved, so `ViTForImageClassification.from_pretrained(folder,
    num_labels=...)` starts with a new, randomly initialised head, like a hub checkpoint would.
    """
    settings = dict(classes=list(classes), epochs=epochs, lr=lr, batch_size=batch_size, num_images=num_images,
                    seed=seed, **vit_kwargs)
    key = "_".join(f"{k}{'-'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items())
    folder = Path(cache_dir) / f"vit_pretrained_{key}"
    if (folder / "config.json").exists():
        return folder
    data = fashion_mnist_classes("train", classes)
    if num_images is not None:
        data = data.select(np.random.default_rng(seed).permutation(len(data))[:num_images])
    torch.manual_seed(seed)
    model = small_vit(num_classes=len(classes), label_names=data.features["labels"].names, **vit_kwargs)
    start = time.perf_counter()
    train_classifier(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=False)
    logger.info("Pretrained the ViT on %d images in %.0fs", len(data), time.perf_counter() - start)
    model.vit.save_pretrained(folder)
    (folder / "pretraining.json").write_text(json.dumps(settings, indent=1))
    return folder


def accuracy_metric(prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for the Trainer: arg-max accuracy."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


@dataclass
class Checkpoint:
    epoch: int
    path: str
    verified_accuracy: float


@dataclass
class Trajectory:
    """A finished `finetune` run: one checkpoint per epoch with its verified accuracy, and the Trainer's best."""

    output_dir: str
    checkpoints: list[Checkpoint]
    best: str  # the Trainer's best_model_checkpoint: the first epoch with the highest verified accuracy
    train_seconds: float
    train_loss: list[float]  # mean training loss of each epoch

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def best_checkpoint(self) -> Checkpoint:
        return next(c for c in self.checkpoints if c.path == self.best)

    def top(self, k: int) -> list[Checkpoint]:
        """The k checkpoints with the highest verified accuracy (earlier epoch first on ties)."""
        return sorted(self.checkpoints, key=lambda c: (-c.verified_accuracy, c.epoch))[:k]

    def save(self) -> None:
        Path(self.output_dir, TRAJECTORY_NAME).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> Trajectory:
        values = json.loads(Path(output_dir, TRAJECTORY_NAME).read_text())
        values["checkpoints"] = [Checkpoint(**c) for c in values["checkpoints"]]
        return cls(**values)


def finetune(model: PreTrainedModel, train: datasets.Dataset, verified: datasets.Dataset,
             output_dir: str | os.PathLike, epochs: int, lr: float, batch_size: int, seed: int,
             eval_batch_size: int = 64) -> Trajectory:
    """Fine-tune `model` in place with `Trainer`, evaluating on `verified` and checkpointing every epoch.

    A finished run in `output_dir` is reused (the model is loaded from its last checkpoint); an
    unfinished one is discarded and retrained. Checkpoints hold the model only (no optimizer state):
    the baselines and repairs read weights, and they cost a third of the disk.
    """
    output_dir = Path(output_dir)
    if (output_dir / TRAJECTORY_NAME).exists():
        trajectory = Trajectory.load(output_dir)
        if Path(trajectory.final.path, "adapter_model.safetensors").is_file():  # a peft LoRA run
            from peft.utils import load_peft_weights, set_peft_model_state_dict

            set_peft_model_state_dict(model, load_peft_weights(trajectory.final.path))
        else:
            model.load_state_dict(type(model).from_pretrained(trajectory.final.path).state_dict())
        return trajectory
    if output_dir.exists():
        shutil.rmtree(output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size, use_cpu=True, save_strategy="epoch", eval_strategy="epoch",
        logging_strategy="epoch", metric_for_best_model="accuracy", save_only_model=True, seed=seed, data_seed=seed,
        report_to=[], disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=verified,
                      compute_metrics=accuracy_metric)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log dict
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    evals = [h for h in history if "eval_accuracy" in h]
    checkpoints = [Checkpoint(epoch=round(h["epoch"]), verified_accuracy=h["eval_accuracy"],
                              path=str(output_dir / f"checkpoint-{h['step']}")) for h in evals]
    missing = [c.path for c in checkpoints if not os.path.isdir(c.path)]
    if missing:
        raise RuntimeError(f"Expected one checkpoint per epoch; {missing} are missing from {output_dir}.")
    trajectory = Trajectory(output_dir=str(output_dir), checkpoints=checkpoints,
                            best=str(trainer.state.best_model_checkpoint), train_seconds=seconds,
                            train_loss=[h["loss"] for h in history if "loss" in h])
    trajectory.save()
    return trajectory


def load_checkpoint(model_class: type[PreTrainedModel], path: str | os.PathLike) -> PreTrainedModel:
    return model_class.from_pretrained(path).eval()


def average_checkpoints(model_class: type[PreTrainedModel], paths: Sequence[str | os.PathLike]) -> PreTrainedModel:
    """Uniform average of the checkpoints' floating-point weights (a "uniform soup"); other tensors from the first."""
    models = [load_checkpoint(model_class, p) for p in paths]
    averaged = models[0]
    averaged.load_state_dict(average_states([m.state_dict() for m in models]))
    return averaged


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts' floating-point tensors; other tensors from the first."""
    return {name: torch.stack([s[name] for s in states]).mean(dim=0) if tensor.is_floating_point() else tensor
            for name, tensor in states[0].items()}


def _model_inputs(model: nn.Module, dataset: datasets.Dataset) -> dict[str, torch.Tensor]:
    """The dataset columns `model.forward` takes as inputs (never the labels), read into memory once."""
    accepted = model_input_names(model)
    names = [c for c in dataset.column_names
             if c not in BOOKKEEPING_COLUMNS and c != "labels" and (accepted is None or c in accepted)]
    return dataset.with_format("torch", columns=names)[:]


@torch.no_grad()
def _forward_all(model: nn.Module, dataset: datasets.Dataset, batch_size: int) -> torch.Tensor:
    """Logits of every row of `dataset`, in eval mode, batch by batch."""
    tensors = _model_inputs(model, dataset)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(**{n: t[start:start + batch_size] for n, t in tensors.items()}).logits
                          for start in range(0, len(dataset), batch_size)])
    finally:
        model.train(was_training)


def predictions(model: nn.Module, dataset: datasets.Dataset, batch_size: int = 64) -> np.ndarray:
    """Arg-max class of every row (per-sample, so two models can be compared on the same samples)."""
    return _forward_all(model, dataset, batch_size).argmax(dim=-1).numpy()


def head_inputs(model: nn.Module, dataset: datasets.Dataset, head: str = "classifier", batch_size: int = 64
                ) -> torch.Tensor:
    """The rows the `head` layer reads for every sample of `dataset` (eval mode), captured by a forward pre-hook."""
    rows: list[torch.Tensor] = []
    handle = model.get_submodule(head).register_forward_pre_hook(
        lambda _module, args: rows.append(args[0].detach().double()))
    try:
        _forward_all(model, dataset, batch_size)
    finally:
        handle.remove()
    return torch.cat(rows)


def fit_softmax_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                           max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2/2 |W|^2 (bias free), solved with L-BFGS.

    Features should be standardised. Returns (weight (C, d), bias (C,)) in the features' dtype.
    """
    weight = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-8, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@dataclass
class HeadRefit:
    l2: float
    cv_loss: dict[float, float]  # mean held-out cross-entropy per L2 strength
    cv_accuracy: dict[float, float]


def refit_head(model: nn.Module, verified: datasets.Dataset, head: str = "classifier",
               l2_grid: Sequence[float] = tuple(10.0 ** np.arange(-4, 1.5, 0.5)), num_folds: int = 5,
               seed: int = 0, label_column: str = "labels") -> HeadRefit:
    """Replace the linear `head` of `model` (in place) by a softmax regression fitted on `verified`.

    The L2 strength is the one with the lowest mean held-out cross-entropy over `num_folds` stratified
    folds (smoother than accuracy on folds of ~100 samples); the final fit uses every verified sample.
    Features are standardised for the fit and the scaling is folded back into the head's weights.
    """
    features = head_inputs(model, verified, head)
    labels = torch.as_tensor(column_array(verified, label_column), dtype=torch.long)
    layer = model.get_submodule(head)
    num_classes = layer.out_features

    def standardised_fit(rows: np.ndarray, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = features[rows]
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
        weight, bias = fit_softmax_regression((x - mean) / std, labels[rows], num_classes, l2)
        return weight, bias, mean, std

    folds = stratified_folds(labels.numpy(), num_folds, seed)
    cv_loss: dict[float, float] = {}
    cv_accuracy: dict[float, float] = {}
    for l2 in l2_grid:
        losses, hits = [], []
        for k, held_out in enumerate(folds):
            fit_rows = np.concatenate([f for j, f in enumerate(folds) if j != k])
            weight, bias, mean, std = standardised_fit(fit_rows, l2)
            logits = ((features[held_out] - mean) / std) @ weight.T + bias
            losses.append(F.cross_entropy(logits, labels[held_out], reduction="none"))
            hits.append(logits.argmax(dim=1) == labels[held_out])
        cv_loss[float(l2)] = float(torch.cat(losses).mean())
        cv_accuracy[float(l2)] = float(torch.cat(hits).double().mean())
    best = min(cv_loss, key=lambda l2: (cv_loss[l2], -l2))
    weight, bias, mean, std = standardised_fit(np.arange(len(labels)), best)
    with torch.no_grad():  # logits = ((x - mean) / std) W^T + b = x (W / std)^T + (b - (W / std) mean)
        scaled = weight / std
        layer.weight.copy_(scaled.to(layer.weight.dtype))
        layer.bias.copy_((bias - scaled @ mean).to(layer.bias.dtype))
    return HeadRefit(l2=best, cv_loss=cv_loss, cv_accuracy=cv_accuracy)


def new_vit_classifier(backbone: str | os.PathLike, label_names: Sequence[str], seed: int) -> ViTForImageClassification:
    """The pretrained ViT backbone with a new head for `label_names`, initialised from `seed`."""
    torch.manual_seed(seed)
    return ViTForImageClassification.from_pretrained(
        backbone, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)})
