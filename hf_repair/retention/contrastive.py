"""A contrastive fine-tune of the model's body on the verified samples alone (SetFit's recipe, Tunstall et al. 2022).

On a few hundred verified samples a cross-entropy fine-tune of a pretrained text encoder learns their labels
and little else; a pair objective learns which of them belong together, which carries further (measured on
MiniLM with 300 verified reviews: a head on the contrastive body reached 75% on test, a cross-entropy fine-tune
61-72%, BENCHMARKS.md). Each iteration pairs every sample with one partner of its label and one of another
label, and the cosine similarity of the two samples' *features* -- the inputs of the classification head -- is
regressed on 1 or 0. The head itself is frozen while the body trains: the pair loss never reads it, and the
caller refits it on the new features (`hf_repair.head_refit`).

The features are the head's inputs, or (`fresh_contrastive_features="token_mean"`, the default for a model that
reads token ids) the backbone's token states averaged over each text's tokens: what a sentence encoder was
pretrained to give (measured on MiniLM: the pair loss on the pooled CLS state the head reads reached 71% on test
where the token mean reached 75%, BENCHMARKS.md).

The loop runs on Accelerate like the guarded fine-tune (one process or `accelerate launch`: the pairs are
sharded, the gradients averaged, so every process ends with the same weights). It has no held-out check of
its own: the verified folds judge the refitted model. On a NaN or inf loss every weight is restored.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import RepairConfig
from ..data import CollateFn, check_label_range, column_array, model_columns
from ..evaluation import ForwardFn, eval_mode, input_names_for
from ..modeling.lora import has_lora_factors
from ..modeling.weights import ModelSnapshot
from .finetune_data import FinetuneSet, TargetCollator
from .finetuner import nonfinite_anywhere, release_prepared

logger = logging.getLogger(__name__)


@dataclass
class ContrastiveArguments:
    """The knobs of one contrastive fine-tune (filled from `RepairConfig` by `contrastive_finetune`)."""

    learning_rate: float
    iterations: int  # pairs per sample: two per iteration (one of its label, one of another)
    batch_size: int  # pairs per step and process
    seed: int = 0
    warmup_ratio: float = 0.1  # then linear decay to 0, as SetFit
    disable_tqdm: bool = False


@dataclass
class ContrastiveResult:
    """What the fine-tune did: its steps and the pair loss it ended at."""

    steps: int
    num_pairs: int
    final_loss: float  # the mean pair loss of the last tenth of the steps
    stop_reason: str  # "completed" | "nan_loss" (every weight restored)
    time_s: float


def sample_pairs(labels: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """(2 x iterations x n, 3) rows of (sample, partner, 1 if they share a label else 0), shuffled.

    Per iteration each sample gets one partner drawn from its label (itself where it is the label's only
    sample) and one drawn from the other labels, so the pairs are balanced whatever the class sizes.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"A contrastive fine-tune needs verified samples of at least two labels, got only {classes.tolist()}.")
    generator = np.random.default_rng(seed)
    members = {label: np.flatnonzero(labels == label) for label in classes}
    others = {label: np.flatnonzero(labels != label) for label in classes}
    samples = np.arange(len(labels))
    pairs = []
    for _ in range(iterations):
        same = np.array([generator.choice(members[label]) for label in labels])
        other = np.array([generator.choice(others[label]) for label in labels])
        pairs.append(np.stack([samples, same, np.ones_like(samples)], 1))
        pairs.append(np.stack([samples, other, np.zeros_like(samples)], 1))
    pairs = np.concatenate(pairs)
    return pairs[generator.permutation(len(pairs))]


def token_states_module(model: nn.Module) -> nn.Module:
    """The backbone whose first output is the token states: a transformers model's `base_model` (a peft model's too)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is inner:
        raise ValueError(f"fresh_contrastive_features='token_mean' averages the token states of a transformers model's "
                         f"backbone (model.base_model), and {type(inner).__name__} has none; use 'head_inputs'.")
    return backbone


def contrastive_finetune(model: nn.Module, head: nn.Module, verified: datasets.Dataset, config: RepairConfig,
                         forward_fn: ForwardFn, collate_fn: CollateFn | None = None,
                         seed: int | None = None) -> ContrastiveResult:
    """Fine-tune `model`'s body in place on pairs of `verified` samples, reading the features `head` is given.

    `fresh_contrastive_iterations` iterations at `contrastive_learning_rate`, `retention_batch_size` pairs
    per step (else `batch_size`); `seed` (default `repair_seed`) draws the pairs, their order and the dropout.
    """
    columns = [c for c in model_columns(verified, config.label_column, input_names_for(model, forward_fn))
               if c != config.label_column]
    labels = column_array(verified, config.label_column)
    check_label_range(labels, int(labels.max()) + 1)
    table = FinetuneSet([verified.select_columns(columns + [config.label_column])], np.zeros(len(labels)),
                        np.arange(len(labels)), labels, label_column=config.label_column)
    features = config.fresh_contrastive_features
    if features == "auto":
        features = "token_mean" if "input_ids" in columns else "head_inputs"
    tokens = token_states_module(model) if features == "token_mean" else None
    args = ContrastiveArguments(
        learning_rate=contrastive_learning_rate(config, model),
        iterations=config.fresh_contrastive_iterations,
        batch_size=config.retention_batch_size or config.batch_size,
        seed=config.repair_seed if seed is None else seed,
        disable_tqdm=config.repair_disable_tqdm,
    )
    return ContrastiveFinetuner(model, head, args, forward_fn, collate_fn, tokens).run(table)


def contrastive_learning_rate(config: RepairConfig, model: nn.Module) -> float:
    """`fresh_contrastive_learning_rate`, or where None: 5e-5 for a full fine-tune, 5e-4 for a LoRA adapter's factors
    (measured on MiniLM with a rank-8 adapter: at 5e-5 it closed 37% of the gap on one seed, at 5e-4 93-105% on
    three, BENCHMARKS.md)."""
    if config.fresh_contrastive_learning_rate is not None:
        return config.fresh_contrastive_learning_rate
    return 5e-4 if has_lora_factors(model) else 5e-5


class ContrastiveFinetuner:
    """Trains the trainable parameters the features depend on by the cosine similarity of pairs of features: the
    head's inputs, or with `tokens` that module's token states averaged over the attention mask.

    The others (the head; a pooler whose output only the head reads) get no gradient from the pair loss, so they
    are found by one backward pass before training and frozen during it: DDP must not wait for their gradients.
    """

    def __init__(self, model: nn.Module, head: nn.Module, args: ContrastiveArguments, forward_fn: ForwardFn,
                 collate_fn: CollateFn | None = None, tokens: nn.Module | None = None) -> None:
        self.model = model
        self.head = head
        self.args = args
        self.forward_fn = forward_fn
        self.collate_fn = collate_fn
        self.tokens = tokens

    def run(self, table: FinetuneSet) -> ContrastiveResult:
        args, model = self.args, self.model
        start_time = time.perf_counter()
        pairs = sample_pairs(table.labels.numpy(), args.iterations, args.seed)
        collator = TargetCollator(self.collate_fn, int(table.labels.max()) + 1, table.label_column)
        device = next(model.parameters()).device

        def collate(chunk: list[np.ndarray]) -> tuple[dict[str, Any], torch.Tensor]:
            chunk = np.stack(chunk)  # a batch's first samples, then their partners: one forward pass
            batch = collator(table.__getitems__(np.concatenate([chunk[:, 0], chunk[:, 1]])))
            return batch.inputs, torch.as_tensor(chunk[:, 2], dtype=torch.float32)

        loader = DataLoader(list(pairs), batch_size=args.batch_size, shuffle=False, collate_fn=collate)
        unused = self._unused_parameters(*next(iter(loader)), device)
        frozen = {id(p) for p in unused}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters outside its head that the "
                             "contrastive features depend on.")
        snapshot = ModelSnapshot(model)
        accelerator = Accelerator(device_placement=False)  # joins the existing state; the model stays on its device
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
        for p in unused:
            p.requires_grad_(False)
        try:
            prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            steps = len(loader)
            warmup = max(1.0, args.warmup_ratio * steps)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (steps - step) / steps))
            losses = self._train(prepared, loader, optimizer, schedule, accelerator, device, snapshot)
        finally:
            for p in unused:
                p.requires_grad_(True)
            release_prepared(accelerator, model)
        stop_reason = "completed" if len(losses) == steps else "nan_loss"
        if stop_reason == "nan_loss":
            logger.warning("contrastive fine-tune: the loss became NaN or inf at step %d; every weight is restored to "
                           "its starting value.", len(losses) + 1)
        tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
        return ContrastiveResult(steps=len(losses), num_pairs=len(pairs), final_loss=float(np.mean(tail)),
                                 stop_reason=stop_reason, time_s=time.perf_counter() - start_time)

    def _unused_parameters(self, inputs: dict[str, Any], targets: torch.Tensor, device: torch.device) -> list[nn.Parameter]:
        """The trainable parameters the pair loss of one batch does not reach (eval mode: no dropout drawn)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        with eval_mode(self.model):
            loss = self._pair_loss(self.model, inputs, targets, device)
        if not loss.requires_grad:  # nothing trainable before the features
            return params
        gradients = torch.autograd.grad(loss, params, allow_unused=True)
        return [p for p, gradient in zip(params, gradients, strict=True) if gradient is None]

    @contextlib.contextmanager
    def _kept_features(self) -> Iterator[list[torch.Tensor]]:
        """During the block, each forward pass appends its features (before pooling) to the list."""
        features: list[torch.Tensor] = []

        def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            features.append(args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v)))

        def keep_output(module: nn.Module, args: tuple, output: Any) -> None:
            features.append(output[0])

        handle = (self.tokens.register_forward_hook(keep_output) if self.tokens is not None
                  else self.head.register_forward_pre_hook(keep_input, with_kwargs=True))
        try:
            yield features
        finally:
            handle.remove()

    def _pair_loss(self, model: nn.Module, inputs: dict[str, Any], targets: torch.Tensor,
                   device: torch.device, autocast: Any = contextlib.nullcontext) -> torch.Tensor:
        """The squared error of the pairs' cosine similarity against 1 (same label) or 0."""
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with self._kept_features() as features, autocast():
            self.forward_fn(model, inputs)
        x = self._pooled(features[-1].float(), inputs.get("attention_mask"))
        half = x.shape[0] // 2
        return F.mse_loss(F.cosine_similarity(x[:half], x[half:], dim=-1), targets.to(device))

    def _pooled(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One row per sample: token states averaged over the attention mask, head inputs flattened."""
        if self.tokens is None:
            return states.flatten(1)
        if attention_mask is None:
            return states.mean(1)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1)

    def _train(self, prepared: nn.Module, loader: Any, optimizer: Any, schedule: Any, accelerator: Accelerator,
               device: torch.device, snapshot: ModelSnapshot) -> list[float]:
        """The training steps; the loss of each (fewer than the loader's on a NaN loss, the weights then restored)."""
        progress = tqdm(total=len(loader), desc="hf_repair: contrastive fine-tune", unit="step",
                        disable=self.args.disable_tqdm or not accelerator.is_main_process)
        losses: list[float] = []
        # dropout draws from the global generator: seeded here, the caller's given back, and its train/eval mode
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(self.model):
            torch.manual_seed(self.args.seed)
            prepared.train()
            try:
                for inputs, targets in loader:
                    loss = self._pair_loss(prepared, inputs, targets, device, accelerator.autocast)
                    if nonfinite_anywhere(loss):
                        snapshot.restore()
                        break
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(loss)
                    optimizer.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
                    progress.update(1)
                    progress.set_postfix(loss=f"{losses[-1]:.4f}")
            except BaseException:
                snapshot.restore()
                raise
            finally:
                progress.close()
        return losses
