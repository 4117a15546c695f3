"""The verified-split pass of identification: one forward (and, for autograd layers, backward) per batch.

It accumulates the influence statistics of the tracked layers, gathers the probe's (and the head refit's)
features with their folds, and fits those clean references by k-fold on the verified split.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RepairConfig
from ..data import VerifiedSplit
from ..evaluation import ForwardFn
from ..modeling.hooks import LayerCapture
from ..utils.distributed import gather_uneven, is_main_process
from .influence import InfluenceModel
from .layers import SelectedLayers
from .probes import HeadRefit, LinearProbe, fit_probe, refit_head

logger = logging.getLogger(__name__)


class VerifiedPass:
    """One pass over the verified split: influence statistics, and the features of the refit and the probe."""

    def __init__(self, model: nn.Module, layers: SelectedLayers, config: RepairConfig, forward_fn: ForwardFn) -> None:
        self.model = model
        self.layers = layers.tracked
        self.num_classes = layers.num_classes
        self.config = config
        self.forward_fn = forward_fn
        generator = torch.Generator().manual_seed(config.repair_seed)
        self.influence = InfluenceModel(layers.tracked, layers.num_classes, config.preconditioner, generator=generator)
        self.head = layers.head
        self.probe_layer = layers.probe
        self.refit: HeadRefit | None = None
        self.probe: LinearProbe | None = None
        self.blind_classes: list[int] = []
        self.num_verified = 0
        self.verified_labels = torch.zeros(0, dtype=torch.long)  # every process's, in fold order
        self.verified_accuracy = math.nan

    def modules(self) -> dict[str, nn.Module]:
        """Every layer whose input is captured: the influence layers and the probe's input layer."""
        modules = {layer.name: layer.module for layer in self.layers}
        if self.probe_layer is not None:
            modules.setdefault(*self.probe_layer)
        return modules

    def run(self, split: VerifiedSplit, refit: bool) -> VerifiedPass:
        """Accumulate the influence statistics and fit the probe (and, if asked, the head refit)."""
        influence = self.influence
        head_rows, probe_rows, labels, folds, predictions = [], [], [], [], []
        progress = tqdm(total=split.num_local_samples(), desc="hf_repair: verified statistics", unit="sample",
                        disable=self.config.repair_disable_tqdm or not is_main_process())
        with LayerCapture(self.modules(), track_grad=influence.needs_backward) as capture:
            for batch in split.batches():
                capture.clear()
                with torch.set_grad_enabled(influence.needs_backward):
                    logits = self.forward_fn(self.model, batch.inputs)
                influence.accumulate(capture, logits, batch.labels)
                labels.append(batch.labels.to(logits.device))
                folds.append(torch.full_like(labels[-1], batch.fold))
                predictions.append(logits.detach().argmax(-1))
                if refit:  # the head's output is the (batch, C) logits, so its input has one row per sample
                    rows = self.head.input_rows(capture.inputs[self.head.name], len(batch.labels), torch.float64)
                    head_rows.append(rows[:, 0])
                if self.probe_layer is not None:
                    probe_rows.append(capture.inputs[self.probe_layer[0]].double())
                progress.update(len(batch.labels))
        progress.close()
        self.blind_classes = influence.finalize(self.config.damping)
        self.num_verified = int(influence.class_counts.sum())
        if self.blind_classes:
            logger.warning(
                "The verified split has no sample of classes %s; the influence score is blind to harm done to them, "
                "and the refit and the probe never predict them. Verify a few samples of each.",
                _class_names(self.model, self.blind_classes),
            )
        all_labels = self.verified_labels = gather_uneven(torch.cat(labels)).cpu()
        all_folds = gather_uneven(torch.cat(folds)).cpu()
        self.verified_accuracy = float((gather_uneven(torch.cat(predictions)).cpu() == all_labels).double().mean())
        if self.probe_layer is not None:  # the probe also estimates the noise rate and suggests labels: always fit
            features = gather_uneven(torch.cat(probe_rows)).cpu()
            self.probe = fit_probe(features, all_labels, all_folds, self.num_classes)
            logger.info("Probe on the input of %s: L2 %.0e, held-out accuracy %.4f.",
                        self.probe_layer[0], self.probe.l2, self.probe.heldout_accuracy)
        if refit:  # only when a score needs it: its k-fold fits cost time
            features = gather_uneven(torch.cat(head_rows)).cpu()
            self.refit = refit_head(features, all_labels, all_folds, self.head.head_weight().cpu())
            logger.info("Head refit on the verified split: prox %.0e, held-out accuracy %.4f (trained model %.4f).",
                        self.refit.prox, self.refit.heldout_accuracy, self.verified_accuracy)
        return self


def _class_names(model: nn.Module, classes: list[int]) -> str:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return ", ".join(f"{c} ({id2label[c]})" if c in id2label else str(c) for c in classes)
