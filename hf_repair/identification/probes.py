"""Clean references: softmax regressions fitted on verified features, their strength chosen by k-fold.

The verified pass of identification feeds two of them: `HeadRefit` (the classification head refitted
near its trained weights: the influence's Newton step taken to convergence) and `LinearProbe` (a fresh
regression on the input of the classifier MLP, which memorisation of noisy labels leaves cleaner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .influence import EXACT_MAX_PARAMETERS, head_gauss_newton

# Proximal strengths tried for the head refit, in units of the mean eigenvalue of the head's Gauss-Newton matrix.
REFIT_PROX_GRID = (1e-3, 1e-2, 1e-1, 1.0)
# L2 strengths tried for the probe, on standardised features.
PROBE_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
# The probe reads this many principal directions of the verified features: measured on Fashion-MNIST, 64
# lose under 0.003 AUROC against all of them and keep the fit a small Newton problem.
PROBE_COMPONENTS = 64


@dataclass
class HeadRefit:
    """The classification head refitted on the verified split, kept close to the trained head.

    It is the many-step counterpart of the influence score: the influence is the first-order change of
    a sample's given-label log-likelihood under a damped Newton step on the verified loss; the refit
    takes that step to convergence. The proximal strength is chosen by k-fold held-out log-likelihood
    on the verified split, so no oracle is needed.
    """

    weight: torch.Tensor  # (C, in) with the bias as the last column
    prox: float  # relative to the mean Gauss-Newton eigenvalue
    heldout_accuracy: float  # refit on k-1 folds, scored on the held-out fold, pooled
    heldout_log_probs: torch.Tensor = field(repr=False)  # (n_verified, C): each sample under the fit without its fold

    def log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.to(self.weight) @ self.weight.t()).log_softmax(-1)


def refit_head(features: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, weight: torch.Tensor) -> HeadRefit:
    """Fit W = argmin mean CE([x, 1] W^T, y) + prox/2 ||W - W_trained||^2 on the verified head inputs."""
    features, weight = features.double(), weight.double()
    probs = (features @ weight.t()).softmax(-1)
    curvature = float((probs * (1 - probs)).sum(-1).mean())
    scale = curvature * float((features * features).sum(-1).mean()) / (weight.shape[0] * weight.shape[1])
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    penalty, heldout = _cross_validate(features, labels, folds, weight, [r * scale for r in REFIT_PROX_GRID])
    return HeadRefit(weight=_fit(features, labels, weight, penalty), prox=penalty / scale,
                     heldout_accuracy=_accuracy(heldout, labels), heldout_log_probs=heldout)


@dataclass
class LinearProbe:
    """A softmax regression fitted on the verified split from the features the classifier MLP reads.

    The layers closest to the logits are where a network memorises its noisy labels; the input of its
    first fully connected layer (a CNN's pooled features, BERT's [CLS] state) is much less affected, so
    a probe fitted there on verified labels is a clean reference that memorisation does not fool.
    Features are standardised and reduced to their top principal directions on the verified split.
    """

    mean: torch.Tensor  # (d,)
    scale: torch.Tensor  # (d,)
    basis: torch.Tensor  # (d, k)
    weight: torch.Tensor  # (C, k + 1)
    l2: float
    heldout_accuracy: float
    heldout_log_probs: torch.Tensor = field(repr=False)  # (n_verified, C): each sample under the fit without its fold

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        reduced = ((features.to(self.mean) - self.mean) / self.scale) @ self.basis
        return (_with_bias(reduced) @ self.weight.t()).log_softmax(-1)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, num_classes: int) -> LinearProbe:
    """Standardise, keep PROBE_COMPONENTS principal directions, choose the L2 strength by k-fold, fit."""
    features = features.double()
    mean = features.mean(0)
    std = features.std(0, correction=0)
    # Constant features (dead units) are only centred: dividing by ~0 would blow up unseen values.
    scale = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    standardised = (features - mean) / scale
    _, _, vh = torch.linalg.svd(standardised, full_matrices=False)
    basis = vh[: min(PROBE_COMPONENTS, vh.shape[0])].t()
    reduced = _with_bias(standardised @ basis)
    start = torch.zeros(num_classes, reduced.shape[1], dtype=torch.float64)
    l2, heldout = _cross_validate(reduced, labels, folds, start, list(PROBE_L2_GRID))
    return LinearProbe(mean=mean, scale=scale, basis=basis, weight=_fit(reduced, labels, start, l2), l2=l2,
                       heldout_accuracy=_accuracy(heldout, labels), heldout_log_probs=heldout)


def _with_bias(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def _accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((log_probs.argmax(-1) == labels).double().mean())


def _cross_validate(features: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, anchor: torch.Tensor,
                    penalties: list[float]) -> tuple[float, torch.Tensor]:
    """The penalty with the best pooled held-out log-likelihood over the folds, and every sample's held-out
    log-probabilities under it (the fit on the other folds).

    Penalties are tried from the strongest down, each fit warm-started from the previous one of its fold.
    """
    fold_ids = sorted(folds.unique().tolist())
    previous = {fold: anchor for fold in fold_ids}
    best_nll, best_penalty, best_heldout = math.inf, penalties[0], None
    for penalty in sorted(penalties, reverse=True):
        heldout = features.new_empty(len(labels), anchor.shape[0])
        for fold in fold_ids:
            held = folds == fold
            previous[fold] = _fit(features[~held], labels[~held], anchor, penalty, init=previous[fold], tolerance=1e-6)
            heldout[held] = (features[held] @ previous[fold].t()).log_softmax(-1)
        nll = float(F.nll_loss(heldout, labels, reduction="sum"))
        if nll < best_nll or best_heldout is None:
            best_nll, best_penalty, best_heldout = nll, penalty, heldout
    return best_penalty, best_heldout


def _fit(features: torch.Tensor, labels: torch.Tensor, anchor: torch.Tensor, penalty: float,
         init: torch.Tensor | None = None, tolerance: float = 1e-10, max_iter: int = 100) -> torch.Tensor:
    """Minimise mean CE([x, 1] W^T, y) + penalty/2 ||W - anchor||^2 from `init` (default: the anchor),
    to within about `tolerance` of the minimum.

    Damped Newton for small heads (a few large matrix products per step, so it does not suffer from
    thread oversubscription the way many small L-BFGS steps do), L-BFGS for large ones.
    """
    onehot = F.one_hot(labels, anchor.shape[0]).to(features.dtype)
    init = anchor if init is None else init

    def objective(weight: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(features @ weight.t(), labels) + 0.5 * penalty * (weight - anchor).pow(2).sum()

    if anchor.numel() > EXACT_MAX_PARAMETERS:
        weight = init.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([weight], max_iter=max_iter, tolerance_grad=tolerance, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective(weight)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return weight.detach()

    weight = init.clone()
    n = features.shape[0]
    eye = torch.eye(anchor.numel(), dtype=anchor.dtype, device=anchor.device)
    value = objective(weight)
    for _ in range(max_iter):
        probs = (features @ weight.t()).softmax(-1)
        grad = (probs - onehot).t() @ features / n + penalty * (weight - anchor)
        hessian = head_gauss_newton(probs, features) / n + penalty * eye  # the exact Hessian of this objective
        step = torch.linalg.solve(hessian, grad.reshape(-1)).reshape(grad.shape)
        decrement = float((grad * step).sum())
        if decrement < 2 * tolerance:  # the Newton decrement: the objective is within ~decrement/2 of its minimum
            break
        size = 1.0
        while True:  # backtracking: Newton steps are full steps near the optimum
            candidate = weight - size * step
            new_value = objective(candidate)
            if new_value <= value - 0.25 * size * decrement or size < 1e-6:
                break
            size *= 0.5
        weight, value = candidate, new_value
    return weight
