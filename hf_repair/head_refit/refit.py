"""Refitting the head on verified samples, and judging the refit on samples it was not fitted on.

The fit itself is identification's `refit_head`: a softmax regression on the head's inputs, pulled
towards the trained head by an L2 term whose strength is chosen by k-fold held-out log-likelihood.
Here it is wrapped twice: `fit_head` chooses that strength on stratified folds of the samples it is
given, and `out_of_fold_logits` refits on every fold's complement and predicts the fold, so each
verified sample is scored by a head that never saw it (nested: the strength is chosen without it too).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import stratified_folds
from ..identification.probes import HeadRefit, refit_head
from .head import same_on_every_process


def fit_head(features: torch.Tensor, labels: torch.Tensor, anchor: torch.Tensor, num_folds: int, seed: int) -> HeadRefit:
    """The head refitted on these samples; its L2 strength chosen by `num_folds`-fold cross-validation on them."""
    folds = torch.empty_like(labels)
    for fold, members in enumerate(stratified_folds(labels.numpy(), num_folds, seed)):
        folds[torch.as_tensor(members)] = fold
    refit = refit_head(features, labels, folds, anchor)
    refit.weight = same_on_every_process(refit.weight)
    return refit


def refit_and_predict(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, anchor: torch.Tensor,
                      num_folds: int, seed: int) -> torch.Tensor:
    """Refit on the `train` rows, return the (float64) logits of the other rows."""
    refit = fit_head(features[train], labels[train], anchor, num_folds, seed)
    return features[~train] @ refit.weight.t()


def out_of_fold_logits(features: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, anchor: torch.Tensor,
                       seed: int) -> torch.Tensor:
    """Each sample's logits under the head refitted on the other folds (strength chosen on those folds alone)."""
    fold_ids = np.unique(folds.numpy()).tolist()
    logits = torch.empty(len(labels), anchor.shape[0], dtype=torch.float64)
    for fold in fold_ids:
        held = folds == fold
        logits[held] = refit_and_predict(features, labels, ~held, anchor, len(fold_ids), seed)
    return logits
