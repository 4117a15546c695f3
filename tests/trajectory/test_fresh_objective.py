"""How method "auto" resolves `fresh_objective="auto"`, the default: the contrastive fine-tune for a model that reads
token ids, fully fine-tuned or a LoRA adapter (measured on text), cross-entropy for image inputs (the contrastive one
measured below the final weights on a ViT) and models without a head to refit."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from hf_repair import RepairConfig
from hf_repair.evaluation import default_forward, split_verified
from hf_repair.trajectory import CandidateBuilder

from lora_setup import base_model, data, lora_config


class PooledTokenClassifier(nn.Module):
    """Reads token ids, but averages per-token logits after its last linear layer: no head to refit."""

    def __init__(self, vocab_size: int = 60, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.score = nn.Linear(8, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return (self.score(self.embed(input_ids)) * mask).sum(1) / mask.sum(1)


def resolved(model: nn.Module, kind: str, **overrides) -> str:
    config = RepairConfig(method="auto", repair_disable_tqdm=True, batch_size=16, **overrides)
    verified = data(kind, 32, seed=3, noise=0.0)
    split = split_verified(model, verified, config, default_forward)
    return CandidateBuilder(model, None, split, verified, config, default_forward).fresh.objective()


@pytest.mark.parametrize("make, kind, expected", [
    (lambda: base_model("bert"), "bert", "contrastive"),
    (lambda: get_peft_model(base_model("bert"), lora_config("bert")), "bert", "contrastive"),
    (lambda: base_model("vit"), "vit", "cross_entropy"),
    (PooledTokenClassifier, "bert", "cross_entropy"),
])
def test_auto_pairs_a_text_model_and_falls_back_to_cross_entropy_elsewhere(make, kind, expected):
    assert RepairConfig().fresh_objective == "auto"
    assert resolved(make(), kind) == expected


@pytest.mark.parametrize("objective", ["cross_entropy", "contrastive"])
def test_an_objective_that_is_named_is_kept(objective):
    assert resolved(base_model("bert"), "bert", fresh_objective=objective) == objective
    assert resolved(base_model("vit"), "vit", fresh_objective=objective) == objective
