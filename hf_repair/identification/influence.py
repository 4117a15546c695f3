"""Per-sample gradient features and a damped Gauss-Newton preconditioner for influence scores.

For a layer with input rows a (one per position or patch, with a 1 appended for the bias) and
output-gradient rows g, a sample's loss gradient is the sum of outer products G = sum_t g_t a_t^T.
Both factors are read with forward hooks, so per-sample gradients never need one backward pass per
sample, and they are never materialised: the influence <G, V> on a preconditioned verified gradient
V (out x in) is sum_t g_t^T V a_t.

For the classification head (the layer whose output *is* the logits) the output gradient of the
cross-entropy has a closed form, g = softmax(logits) - onehot(label), so scoring needs no backward
at all and the Gauss-Newton matrix is exact: H = E[(diag(p) - p p^T) (x) a a^T]. Other layers get g
from one `torch.autograd.grad` of the summed loss with respect to their outputs (samples of a batch
do not interact in eval mode), and a Kronecker-factored (K-FAC) Fisher whose output-side factor uses
every label weighted by the model's probability of it, which makes it the Gauss-Newton matrix (with
more than `EXPECTED_FISHER_MAX_CLASSES` classes, one label drawn from the model per sample instead).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config.identification import PRECONDITIONERS
from ..modeling.hooks import LayerCapture
from ..modeling.layers import LayerAdapter
from ..utils.distributed import sum_across_processes

logger = logging.getLogger(__name__)

# "auto" inverts the exact Gauss-Newton block of a layer up to this many parameters (a 4096^2
# float64 matrix is 128 MiB); larger layers use K-FAC.
EXACT_MAX_PARAMETERS = 4096
# Up to this many classes the Fisher of an autograd layer is the exact expectation over labels (one backward
# per class on the verified split: deterministic however it is sharded); above it, one sampled label.
EXPECTED_FISHER_MAX_CLASSES = 32


@dataclass
class TrackedLayer:
    """A layer whose per-sample gradients enter the influence score."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    closed_form: bool  # its output is the logits: dL/d(output) = softmax - onehot, no backward needed

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    def shape(self) -> tuple[int, int]:
        """(out, in) of the per-sample gradient, the bias counted as one more input."""
        weight = self.adapter.effective_weight(self.module)
        if self.adapter.layout == "conv1d":  # GPT-2 Conv1D stores (in, out)
            out_dim = weight.shape[1]
        else:
            out_dim = weight.shape[0]
        return out_dim, self.adapter.input_dim(self.module) + int(self.has_bias)

    def input_rows(self, inputs: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, T, in): the layer's input rows per sample, with a column of ones for the bias."""
        rows = self.adapter.input_rows(self.module, inputs, None).to(dtype)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows.reshape(batch_size, -1, rows.shape[-1])

    def head_weight(self) -> torch.Tensor:
        """The head's weight with the bias as a last column: logits = [x, 1] @ W^T."""
        weight = self.adapter.effective_weight(self.module).detach()
        weight = weight.t() if self.adapter.layout == "conv1d" else weight.reshape(weight.shape[0], -1)
        if self.has_bias:
            weight = torch.cat([weight, self.module.bias.detach()[:, None]], dim=1)
        return weight


def gradient_rows(
    layer: TrackedLayer, inputs: torch.Tensor, output_grad: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, g): (batch, T, in) input rows (bias column included) and (batch, T, out) output-gradient rows."""
    rows = layer.input_rows(inputs, batch_size, dtype)
    if layer.adapter.layout == "conv2d":  # (b, C_out, H, W) -> (b, H*W, C_out), the order unfold uses
        grad = output_grad.flatten(2).transpose(1, 2)
    else:
        grad = output_grad
    return rows, grad.reshape(batch_size, -1, grad.shape[-1]).to(dtype)


@dataclass
class _LayerStatistics:
    """Running sums over the verified split for one layer (all float64)."""

    exact: bool
    class_gradients: torch.Tensor  # (C, out, in): sum of per-sample gradients of each class
    hessian: torch.Tensor | None = None  # exact: (out*in, out*in)
    input_factor: torch.Tensor | None = None  # K-FAC: sum of a a^T over rows
    output_factor: torch.Tensor | None = None  # K-FAC: sum of g g^T over rows (or of diag(p) - pp^T)
    rows: int = 0
    samples: int = 0
    preconditioned: torch.Tensor | None = field(default=None, repr=False)  # (C, out, in): H^-1 mean_c


class InfluenceModel:
    """Accumulates the verified statistics of the tracked layers and scores samples against them.

    Usage: `accumulate(...)` for every verified batch, `finalize(damping)` once (sums across processes
    and solves H V_c = mean verified gradient of class c), then `class_influence(...)` per batch.
    """

    def __init__(
        self,
        layers: list[TrackedLayer],
        num_classes: int,
        preconditioner: str = "auto",
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> None:
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {list(PRECONDITIONERS)}, got {preconditioner!r}.")
        self.layers = layers
        self.num_classes = num_classes
        self.preconditioner = preconditioner
        self.dtype = dtype
        self.generator = generator
        self.class_counts = torch.zeros(num_classes, dtype=dtype)
        self.stats: dict[str, _LayerStatistics] = {}
        for layer in layers:
            out_dim, in_dim = layer.shape()
            exact = preconditioner == "exact" or (
                preconditioner == "auto" and layer.closed_form and out_dim * in_dim <= EXACT_MAX_PARAMETERS
            )
            device = layer.module.weight.device
            stats = _LayerStatistics(exact=exact, class_gradients=torch.zeros(num_classes, out_dim, in_dim, dtype=dtype, device=device))
            if preconditioner != "identity":
                if exact:
                    stats.hessian = torch.zeros(out_dim * in_dim, out_dim * in_dim, dtype=dtype, device=device)
                else:
                    stats.input_factor = torch.zeros(in_dim, in_dim, dtype=dtype, device=device)
                    stats.output_factor = torch.zeros(out_dim, out_dim, dtype=dtype, device=device)
            self.stats[layer.name] = stats

    @property
    def needs_backward(self) -> bool:
        return any(not layer.closed_form for layer in self.layers)

    @property
    def needs_fisher_backward(self) -> bool:
        return self.preconditioner != "identity" and self.needs_backward

    # ------------------------------------------------------------------------------------------
    # output gradients

    def output_gradients(
        self, capture: LayerCapture, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """dL/d(output) of every tracked layer for the cross-entropy with `labels`, summed (weighted) over samples."""
        grads: dict[str, torch.Tensor] = {}
        residual = logits.detach().to(self.dtype).softmax(-1) - F.one_hot(labels, logits.shape[-1]).to(self.dtype)
        if weights is not None:
            residual = residual * weights[:, None].to(residual)
        autograd_layers = []
        for layer in self.layers:
            if layer.closed_form:
                grads[layer.name] = residual
            else:
                autograd_layers.append(layer.name)
        if autograd_layers:
            outputs = [capture.outputs[name] for name in autograd_layers]
            losses = F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), labels, reduction="none")
            loss = (losses * weights.to(losses)).sum() if weights is not None else losses.sum()
            found = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
            for name, grad, output in zip(autograd_layers, found, outputs, strict=True):
                grads[name] = torch.zeros_like(output) if grad is None else grad
        return grads

    # ------------------------------------------------------------------------------------------
    # verified statistics

    def accumulate(self, capture: LayerCapture, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one verified batch: per-class gradient sums and the Gauss-Newton statistics."""
        batch = labels.shape[0]
        labels = labels.to(logits.device)
        grads = self.output_gradients(capture, logits, labels)
        probs = logits.detach().to(self.dtype).softmax(-1)
        fisher = self._fisher_gradients(capture, logits, probs) if self.needs_fisher_backward else []
        self.class_counts += torch.bincount(labels.cpu(), minlength=self.num_classes).to(self.dtype)

        for layer in self.layers:
            stats = self.stats[layer.name]
            a, g = gradient_rows(layer, capture.inputs[layer.name], grads[layer.name], batch, self.dtype)
            stats.samples += batch
            stats.rows += a.shape[0] * a.shape[1]
            per_class = labels.to(a.device)
            for cls in per_class.unique().tolist():
                member = per_class == cls
                stats.class_gradients[cls] += torch.einsum("nto,nti->oi", g[member], a[member])
            if self.preconditioner == "identity":
                continue
            if stats.exact:
                if layer.closed_form and a.shape[1] == 1:
                    stats.hessian += head_gauss_newton(probs, a[:, 0])
                else:
                    for grads_fisher in fisher:
                        _, gs = gradient_rows(layer, capture.inputs[layer.name], grads_fisher[layer.name], batch, self.dtype)
                        per_sample = torch.einsum("nto,nti->noi", gs, a).reshape(batch, -1)
                        stats.hessian += per_sample.t() @ per_sample
            else:
                flat_a = a.reshape(-1, a.shape[-1])
                stats.input_factor += flat_a.t() @ flat_a
                if layer.closed_form and a.shape[1] == 1:
                    stats.output_factor += torch.diag(probs.sum(0)) - probs.t() @ probs
                else:
                    for grads_fisher in fisher:
                        _, gs = gradient_rows(layer, capture.inputs[layer.name], grads_fisher[layer.name], batch, self.dtype)
                        flat_g = gs.reshape(-1, gs.shape[-1])
                        stats.output_factor += flat_g.t() @ flat_g

    def _fisher_gradients(self, capture: LayerCapture, logits: torch.Tensor, probs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Output gradients whose outer products sum to the Fisher = Gauss-Newton matrix of cross-entropy.

        sum_c p_c g_c g_c^T over every label c (each gradient scaled by sqrt(p_c)); with many classes,
        one label drawn from the model per sample (an unbiased estimate).
        """
        if self.num_classes > EXPECTED_FISHER_MAX_CLASSES:
            draws = torch.multinomial(probs.float().cpu(), 1, generator=self.generator).reshape(-1).to(logits.device)
            return [self.output_gradients(capture, logits, draws)]
        return [
            self.output_gradients(capture, logits, torch.full_like(probs[:, 0], c, dtype=torch.long), probs[:, c].sqrt())
            for c in range(self.num_classes)
        ]

    def finalize(self, damping: float) -> list[int]:
        """Sum the statistics over processes and precondition each class's mean verified gradient.

        Returns the classes with no verified sample (their preconditioned gradient is zero).
        """
        self.class_counts = sum_across_processes(self.class_counts.to(self._device())).cpu()
        blind = [c for c in range(self.num_classes) if self.class_counts[c] == 0]
        for layer in self.layers:
            stats = self.stats[layer.name]
            stats.class_gradients = sum_across_processes(stats.class_gradients)
            totals = sum_across_processes(torch.tensor([stats.samples, stats.rows], dtype=torch.float64, device=stats.class_gradients.device))
            samples, rows = float(totals[0]), float(totals[1])
            counts = self.class_counts.to(stats.class_gradients.device).clamp_min(1.0)
            means = stats.class_gradients / counts[:, None, None]
            if self.preconditioner == "identity":
                stats.preconditioned = means
                continue
            if stats.exact:
                hessian = sum_across_processes(stats.hessian) / samples
                stats.preconditioned = _solve_exact(hessian, means, damping)
                stats.hessian = None
            else:
                input_factor = sum_across_processes(stats.input_factor) / rows
                output_factor = sum_across_processes(stats.output_factor) / rows
                # E[vec(G) vec(G)^T] ~ (rows per sample) * E[g g^T] (x) E[a a^T] (K-FAC, expanded over positions)
                stats.preconditioned = _solve_kfac(output_factor * (rows / samples), input_factor, means, damping)
                stats.input_factor = stats.output_factor = None
        return blind

    def _device(self) -> torch.device:
        return self.layers[0].module.weight.device

    # ------------------------------------------------------------------------------------------
    # scoring

    def class_influence(self, capture: LayerCapture, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, C): s_c(z) = g_z^T H^-1 mean verified gradient of class c, summed over layers.

        Positive: a gradient step on z lowers the verified loss of class c (helpful); negative: harmful.
        """
        batch = labels.shape[0]
        labels = labels.to(logits.device)
        grads = self.output_gradients(capture, logits, labels)
        scores = torch.zeros(batch, self.num_classes, dtype=self.dtype, device=logits.device)
        for layer in self.layers:
            v = self.stats[layer.name].preconditioned  # (C, out, in)
            a, g = gradient_rows(layer, capture.inputs[layer.name], grads[layer.name], batch, self.dtype)
            a, g = a.to(v.device), g.to(v.device)
            if a.shape[1] == 1:  # one row per sample: a direct bilinear form
                scores += torch.einsum("no,coi,ni->nc", g[:, 0], v, a[:, 0]).to(scores.device)
            else:
                for c in range(self.num_classes):
                    scores[:, c] += ((a @ v[c].t()) * g).sum(dim=(1, 2)).to(scores.device)
        return scores


def head_gauss_newton(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_n (diag(p_n) - p_n p_n^T) (x) a_n a_n^T as one matrix product, in (out*in)^2 layout."""
    n, classes = probs.shape
    dim = rows.shape[1]
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    outer = rows[:, :, None] * rows[:, None, :]
    block = curvature.reshape(n, -1).t() @ outer.reshape(n, -1)  # (C*C, in*in): [a, b, j, k]
    return block.reshape(classes, classes, dim, dim).permute(0, 2, 1, 3).reshape(classes * dim, classes * dim)


def _solve_exact(hessian: torch.Tensor, means: torch.Tensor, damping: float) -> torch.Tensor:
    """(H + lambda I)^-1 vec(mean_c) for every class, lambda = damping * mean eigenvalue of H."""
    dim = hessian.shape[0]
    hessian = 0.5 * (hessian + hessian.t())
    lam = damping * float(hessian.diagonal().mean())
    if not math.isfinite(lam) or lam <= 0:
        lam = damping
    system = hessian + lam * torch.eye(dim, dtype=hessian.dtype, device=hessian.device)
    solved = torch.linalg.solve(system, means.reshape(means.shape[0], -1).t()).t()
    return solved.reshape(means.shape)


def _solve_kfac(output_factor: torch.Tensor, input_factor: torch.Tensor, means: torch.Tensor, damping: float) -> torch.Tensor:
    """(S (x) A + lambda I)^-1 applied to each mean_c (out x in), in the eigenbases of S and A."""
    s_vals, s_vecs = torch.linalg.eigh(0.5 * (output_factor + output_factor.t()))
    a_vals, a_vecs = torch.linalg.eigh(0.5 * (input_factor + input_factor.t()))
    s_vals, a_vals = s_vals.clamp_min(0.0), a_vals.clamp_min(0.0)
    eigen = s_vals[:, None] * a_vals[None, :]
    lam = damping * float(eigen.mean())
    if not math.isfinite(lam) or lam <= 0:
        lam = damping
    rotated = s_vecs.t() @ means @ a_vecs  # (C, out, in) in the eigenbases
    return s_vecs @ (rotated / (eigen + lam)) @ a_vecs.t()
