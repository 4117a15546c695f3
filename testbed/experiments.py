"""Reference models and a plain training loop for the demo, benchmarks and tests.

No pretrained image model installs offline, so image experiments train small models from
scratch here: `SmallCNN` (Conv2d + Linear, the layer types the projection repairs) and a
small `ViTForImageClassification`. Both take `model(**batch)` with `pixel_values` and
`labels` and return an output with `.loss` and `.logits`, like any transformers model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

from hf_repair.data import BOOKKEEPING_COLUMNS, model_input_names
from testbed.offline_data import FASHION_MNIST_LABELS

logger = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """A ~110k-parameter CNN for 28x28 images: two conv-ReLU-maxpool blocks, then an MLP head.

    BatchNorm is off by default: its running statistics go stale when weights are edited,
    so the plain network isolates the effect of a repair. `labels` may be class ids or
    per-class probabilities (soft targets); both go through cross-entropy.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        image_size: int = 28,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x2 poolings), got {image_size}.")

        def block(channels_in: int, channels_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(channels_out)] if batch_norm else []
            return [nn.Conv2d(channels_in, channels_out, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, width), *block(width, width))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * (image_size // 4) ** 2, 2 * width),
            nn.ReLU(),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.classifier(self.features(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def small_vit(
    num_classes: int = 10,
    image_size: int = 28,
    patch_size: int = 7,
    hidden_size: int = 64,
    num_layers: int = 4,
    heads: int = 4,
    num_channels: int = 1,
    label_names: Sequence[str] | None = None,
) -> ViTForImageClassification:
    """Build a small, randomly initialised ViT classifier (about 0.2M parameters by default).

    `label_names` fills `id2label`; it defaults to the Fashion-MNIST class names when
    `num_classes` is 10.
    """
    if label_names is None:
        if num_classes == len(FASHION_MNIST_LABELS):
            label_names = FASHION_MNIST_LABELS
        else:
            label_names = [f"LABEL_{i}" for i in range(num_classes)]
    if len(label_names) != num_classes:
        raise ValueError(f"Got {len(label_names)} label names for {num_classes} classes.")
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        num_labels=num_classes,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return ViTForImageClassification(config)


def _input_columns(model: nn.Module, dataset: datasets.Dataset) -> list[str]:
    """Dataset columns named in `model.forward`'s signature, as `transformers.Trainer` selects them."""
    names = model_input_names(model)
    columns = [c for c in dataset.column_names if c not in BOOKKEEPING_COLUMNS and (names is None or c in names)]
    if not columns:
        raise ValueError(
            f"None of the dataset columns {dataset.column_names} is an input of {type(model).__name__}.forward."
        )
    return columns


def _load_columns(dataset: datasets.Dataset, columns: list[str]) -> dict[str, torch.Tensor]:
    """Read `columns` into memory as tensors, once per call of the loops below.

    For the small benchmark datasets these loops are meant for, this is several times
    faster than an Arrow lookup per batch. Columns must have a fixed shape per row (pad
    tokenised text to a common length).
    """
    return dataset.with_format("torch", columns=columns)[:]


def _batches(
    tensors: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield dicts of batched tensors, shuffled with `generator` when one is given."""
    size = len(next(iter(tensors.values())))
    order = torch.randperm(size, generator=generator) if generator is not None else torch.arange(size)
    for indices in order.split(batch_size):
        yield {name: tensor[indices].to(device) for name, tensor in tensors.items()}


def train_classifier(
    model: nn.Module,
    dataset: datasets.Dataset,
    epochs: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train `model` in place with AdamW on `dataset` and return it in eval mode.

    Every column that `model.forward` accepts is passed as `model(**batch)` (`clean_labels`
    and `is_corrupted` never are), and the model must return an output with `.loss`. The
    run is reproducible for a given `seed`: it seeds torch (dropout) and the shuffle.
    The defaults (lr 3e-3, no weight decay) make a model fit noisy labels within a few
    tens of epochs, so the damage that long training does shows up on a CPU budget.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    tensors = _load_columns(dataset, _input_columns(model, dataset))
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(dataset) // batch_size)
    with tqdm(total=epochs * steps_per_epoch, desc="train", disable=not progress) as bar:
        for epoch in range(epochs):
            total_loss = 0.0
            for batch in _batches(tensors, batch_size, device, generator=shuffle):
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            logger.info("epoch %d/%d: mean training loss %.4f", epoch + 1, epochs, total_loss / steps_per_epoch)
    return model.eval()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: datasets.Dataset,
    batch_size: int = 256,
    label_column: str = "labels",
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of `dataset` rows whose arg-max prediction equals `label_column`.

    Labels are not passed to the model, so no loss is computed. Pass
    `label_column="clean_labels"` to score a corrupted training set against the truth.
    """
    if len(dataset) == 0:
        raise ValueError("Cannot evaluate on an empty dataset.")
    if label_column not in dataset.column_names:
        raise ValueError(f"Column {label_column!r} not found; the dataset has {dataset.column_names}.")
    columns = [c for c in _input_columns(model, dataset) if c != "labels"] + [label_column]
    tensors = _load_columns(dataset, columns)
    was_training = model.training
    model.to(device).eval()
    correct = 0
    for batch in _batches(tensors, batch_size, device):
        targets = batch.pop(label_column)
        correct += (model(**batch).logits.argmax(dim=-1) == targets).sum().item()
    model.train(was_training)
    return correct / len(dataset)
