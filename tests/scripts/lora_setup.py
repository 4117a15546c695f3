"""LoRA fine-tunes (peft) of a tiny ViT and a tiny BERT built from configs, on noisy labels; shared by the tests
in tests/peft and the script they launch under `accelerate launch`.

`base_model(kind)` is deterministic, so a fresh base to reload a saved adapter onto is `base_model(kind)` again.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_repair import RepairConfig

NUM_CLASSES = 3
# Adopt the best alpha even when it does not win, so the repair changes weights the tests can check.
FORCED = RepairConfig(alphas=[1.0, 10.0, 1e3], batch_size=16, min_improvement=-1.0, significance_test="none",
                      repair_disable_tqdm=True, seed=0)
# LoRA on linear layers of both kinds of input and, for the ViT, on the patch-embedding convolution.
LORA_TARGETS = {"vit": ["q_proj", "v_proj", "fc1", "projection"], "bert": ["query", "value", "intermediate.dense"]}


def base_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(
            image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=NUM_CLASSES))
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=NUM_CLASSES))


def lora_config(kind: str, **overrides) -> LoraConfig:
    values = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS[kind], modules_to_save=["classifier"])
    return LoraConfig(**{**values, **overrides})


def data(kind: str, n: int, seed: int, noise: float = 0.3) -> datasets.Dataset:
    """Samples whose class is visible (an image quadrant, a vocabulary range); a `noise` share of labels is wrong.

    Text is padded to one length (with an attention mask), so batches stack without a collator.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    noisy = labels.copy()
    flip = rng.random(n) < noise
    noisy[flip] = (labels[flip] + 1) % NUM_CLASSES
    if kind == "vit":
        x = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
        for i, y in enumerate(labels):
            x[i, 0, (y // 2) * 14:(y // 2) * 14 + 14, (y % 2) * 14:(y % 2) * 14 + 14] += 1.5
        columns = {"pixel_values": x}
    else:
        ids, mask = np.zeros((n, 16), dtype=np.int64), np.zeros((n, 16), dtype=np.int64)
        for i, y in enumerate(labels):
            length = int(rng.integers(6, 16))
            ids[i, :length] = rng.integers(3 + 19 * y, 22 + 19 * y, size=length)
            mask[i, :length] = 1
        columns = {"input_ids": ids, "attention_mask": mask}
    return datasets.Dataset.from_dict({**columns, "labels": noisy}).with_format("torch")


def lora_finetuned(kind: str, steps: int = 30, **lora_overrides) -> torch.nn.Module:
    """The base model with a LoRA adapter trained briefly (Adam, full batches) on noisy labels; in eval mode."""
    model = get_peft_model(base_model(kind), lora_config(kind, **lora_overrides))
    train = data(kind, 96, seed=1)[:]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**train).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen base weights of a PeftModel (everything but the LoRA and modules_to_save copies)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k and ".modules_to_save." not in k}
