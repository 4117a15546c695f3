"""The terms of the retention loss: gated per-row cross-entropy, gradient surgery, and the penalty.

Rows gated `GATE_SMALL_LOSS` with the largest losses of their label in the batch are left out of a step: the
small-loss trick of co-teaching (Han et al., NeurIPS 2018), for the corrupted samples identification
missed, which a network fits last.

Rows gated `GATE_FORWARD` are learnt through the noise: their given label is scored against p(x) T, the
model's distribution passed through the estimated transition T[true, given] (forward correction, Patrini et
al., CVPR 2017), so the model is pulled towards the true class rather than the given one.

The penalty pulls the weights towards the trained ones: L2 (proximal), or weighted by a diagonal
Fisher estimated on verified rows (EWC-style).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..evaluation import ForwardFn, eval_mode
from .finetune_data import (
    GATE_AGREEMENT,
    GATE_BELIEF,
    GATE_FORWARD,
    GATE_SMALL_LOSS,
    FinetuneSet,
    TargetBatch,
    TargetCollator,
)


def retention_terms(logits: torch.Tensor, batch: TargetBatch, power: float, trim: float = 0.0,
                    transition: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Per-row weighted cross-entropy; gated rows count as much as the model currently trusts their label.

    `trim`: the share of the `GATE_SMALL_LOSS` rows of each given label with the largest loss that count for
    nothing. Per label, because a model that leans to one class has the largest losses on the others, and
    trimming those would feed the lean (measured: a text fine-tune collapsed to one class).
    `transition`: the (true, given) noise transition the `GATE_FORWARD` rows are learnt through.
    Returns the rows' terms (the loss is their sum over the rows kept), the batch's trusted weight share
    and the number of rows kept.
    """
    log_probs = logits.float().log_softmax(-1)
    per_row = -(batch.targets * log_probs).sum(-1)
    forward = batch.gates == GATE_FORWARD
    if forward.any():
        if transition is None:
            raise ValueError("Rows gated GATE_FORWARD need the noise transition to learn through (noise_transition).")
        observed = (log_probs.exp() @ transition.to(log_probs)).clamp_min(1e-12).log()
        per_row = torch.where(forward, -(batch.targets * observed).sum(-1), per_row)
    with torch.no_grad():
        trust = torch.ones_like(per_row)
        belief = batch.gates == GATE_BELIEF
        if belief.any():
            trust[belief] = log_probs[belief].gather(1, batch.labels[belief, None])[:, 0].exp().pow(power)
        agreement = batch.gates == GATE_AGREEMENT
        if agreement.any():
            trust[agreement] = (log_probs[agreement].argmax(-1) == batch.labels[agreement]).float()
        dropped = 0
        trimmable = batch.gates == GATE_SMALL_LOSS
        for label in batch.labels[trimmable].unique() if trim > 0 else ():
            rows = (trimmable & (batch.labels == label)).nonzero(as_tuple=True)[0]
            count = int(round(trim * len(rows)))
            trust[rows[per_row[rows].topk(count).indices]] = 0.0
            dropped += count
    weights = batch.weights * trust
    return weights * per_row, float(weights.sum() / batch.weights.sum().clamp_min(1e-12)), len(per_row) - dropped


def surgery_gradient(trusted: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """trusted + flagged, less the flagged gradient's component against the trusted one (if they conflict)."""
    dot = torch.dot(trusted, flagged)
    if dot < 0:
        flagged = flagged - dot / torch.dot(trusted, trusted).clamp_min(1e-30) * trusted
    return trusted + flagged


def surgery_backward(trusted_loss: torch.Tensor, flagged_loss: torch.Tensor, params: list[nn.Parameter],
                     accelerator: Accelerator) -> None:
    """Set `.grad` to the surgery gradient of the two losses, averaged over processes in one collective."""
    flat = []
    for loss in (trusted_loss, flagged_loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params, strict=True)]))
    both = accelerator.reduce(torch.stack(flat), reduction="mean")
    combined = surgery_gradient(both[0], both[1])
    offset = 0
    for p in params:
        p.grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def weight_penalty(params: list[nn.Parameter], anchor: list[torch.Tensor],
                   fisher: list[torch.Tensor] | None) -> torch.Tensor:
    """sum (theta - theta0)^2, each term weighted by its diagonal Fisher when given (EWC)."""
    if fisher is None:
        return sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
    return sum((f * (p - a).pow(2)).sum() for p, a, f in zip(params, anchor, fisher, strict=True))


def diagonal_fisher(model: nn.Module, params: list[nn.Parameter], data: FinetuneSet | None,
                    collator: TargetCollator, forward_fn: ForwardFn, batch_size: int, accelerator: Accelerator,
                    device: torch.device) -> list[torch.Tensor]:
    """Diagonal empirical Fisher on verified rows, normalised to mean 1 (so strengths compare with L2).

    Every process reads all the rows (a few hundred), so all hold the same Fisher without a collective.
    """
    if data is None or len(data) == 0:
        raise ValueError('penalty="fisher" needs verified samples to estimate the Fisher information.')
    fisher = [torch.zeros_like(p) for p in params]
    with eval_mode(model):
        for batch in DataLoader(data, batch_size=batch_size, collate_fn=collator):
            batch = batch.to(device)
            with accelerator.autocast():
                logits = forward_fn(model, batch.inputs)
            loss = -(batch.targets * logits.float().log_softmax(-1)).sum(-1).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:  # a batch gradient squared, times its size, estimates the mean per-sample square
                    f.add_(g.detach().pow(2) * len(batch.labels))
    mean = float(sum(f.sum() for f in fisher)) / max(sum(f.numel() for f in fisher), 1)
    return [f / mean if mean > 0 else torch.ones_like(f) for f in fisher]
