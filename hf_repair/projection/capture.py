"""Streaming capture of per-layer input rows through forward pre-hooks (`hf_repair.modeling.hooks`).

Memory is O(d^2) per distinct layer input and per fold, independent of how many samples or
tokens flow through. Layers fed the very same tensor (q, k and v of an attention block) are
grouped on first sight and share one clean space.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling.hooks import LayerHooks
from ..modeling.layers import LayerAdapter
from ..utils.distributed import process_info, sum_across_processes
from .clean_space import CleanSpace

_MIN_GRAM_BLOCK = 96  # narrower bands are slower than the full product they save


class NonFiniteActivationError(ValueError):
    pass


def add_to_upper_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """gram += rows^T rows on the upper triangle only (the lower one is left as it is; see `mirror_upper`).

    A Gram is symmetric, so a band of about d / 8 columns at a time computes each product once: 0.54 of a
    full product's time for d = 3072, 0.66 for d = 768 (one thread), the same sums to float64 round-off.
    """
    d = rows.shape[1]
    block = max(_MIN_GRAM_BLOCK, -(-d // 8))
    if d < 2 * block:
        gram.addmm_(rows.t(), rows)
        return
    for start in range(0, d, block):
        gram[start:start + block, start:].addmm_(rows[:, start:start + block].t(), rows[:, start:])


def mirror_upper(gram: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is `gram`'s."""
    return gram.triu() + gram.triu(1).t()


class GramCollector(LayerHooks):
    """Collects each target layer's input rows per fold ("slot"); `space(leader, without=f)` is the clean space of all folds but f.

    Use as a context manager around forward passes; set `begin_batch(slot, token_mask)` before
    each forward so rows land in the right fold and padded tokens are dropped.

    A layer input's rows are kept as they are while a space built from them could have fewer rows
    than the input's width d, and while they take no more memory than one Gram per slot: such a space
    is decomposed in O(n^2 d) instead of O(d^3) (`CleanSpace.from_rows`). Past that, each slot keeps
    only its Gram sum x x^T, which no number of rows makes larger (its upper triangle, `add_to_upper_gram`).
    """

    def __init__(self, targets: dict[str, tuple[nn.Module, LayerAdapter]], num_slots: int,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__({name: module for name, (module, _) in targets.items()})
        self.targets = targets
        self.num_slots = num_slots
        self.dtype = dtype
        self.leader: dict[str, str] = {}  # layer name -> name of the layer whose rows it shares
        self.counts: dict[str, list[int]] = {}  # leader -> rows per slot
        self.grams: dict[str, torch.Tensor] = {}  # leader -> (num_slots, d, d), once its rows are folded in
        self._kept: dict[str, list[list[torch.Tensor]]] = {}  # leader -> each slot's row chunks, until then
        self._dims: dict[str, int] = {}
        self._totals: dict[str, torch.Tensor] = {}
        self._slot = 0
        self._token_mask: torch.Tensor | None = None
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._seen.clear()

    def begin_batch(self, slot: int, token_mask: torch.Tensor | None = None) -> None:
        self._slot = slot
        self._token_mask = token_mask
        self._seen.clear()  # tensors are only shared within one forward pass

    def on_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        adapter = self.targets[name][1]
        key = (id(x), adapter.row_signature(module))
        seen = self._seen.get(key)
        if name not in self.leader:
            shares = seen is not None and seen[0] is x
            self.leader[name] = seen[1] if shares else name
        leader = self.leader[name]
        if leader != name:
            return
        self._seen[key] = (x, name)
        x = x.detach()
        if adapter.kind == "conv2d":  # convert before unfolding: the patches are kh * kw times the input
            rows = adapter.input_rows(module, x.to(self.dtype), self._token_mask)
        else:  # and after dropping padded tokens
            rows = adapter.input_rows(module, x, self._token_mask).to(self.dtype)
        if name not in self.counts:
            self.counts[name] = [0] * self.num_slots
            self._kept[name] = [[] for _ in range(self.num_slots)]
            self._dims[name] = rows.shape[1]
        self.counts[name][self._slot] += rows.shape[0]
        if name in self.grams:
            gram = self.grams[name][self._slot]
            add_to_upper_gram(gram, rows)
            finite = torch.isfinite(gram.diagonal()).all()  # a NaN or inf row leaves one on the diagonal
        else:
            finite = torch.isfinite(rows).all()
            if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                rows = rows.clone()  # the model may change its own tensor in place later
            self._kept[name][self._slot].append(rows)
            if not self._rows_pay(name):
                self._fold_into_grams(name)
        if not finite:
            raise NonFiniteActivationError(
                f"The input of layer {name!r} has NaN or inf on verified samples; the model "
                f"or the data is broken, and no clean space can be built from it."
            )

    def _rows_pay(self, leader: str) -> bool:
        """Whether some space could still have fewer rows than d, with the rows no larger than the slots' Grams."""
        counts, d = self.counts[leader], self._dims[leader]
        fewest = sum(counts) - max(counts) if self.num_slots > 1 else sum(counts)
        return fewest < d and sum(counts) <= self.num_slots * d

    def _fold_into_grams(self, leader: str) -> None:
        kept, d = self._kept.pop(leader), self._dims[leader]
        device = next(rows.device for chunks in kept for rows in chunks)
        grams = torch.zeros(self.num_slots, d, d, dtype=self.dtype, device=device)
        for slot, chunks in enumerate(kept):
            for rows in chunks:
                add_to_upper_gram(grams[slot], rows)
        self.grams[leader] = grams

    def groups(self) -> dict[str, list[str]]:
        """leader -> every layer sharing its rows, in model order."""
        out: dict[str, list[str]] = {}
        for name in self.targets:
            if name in self.leader:
                out.setdefault(self.leader[name], []).append(name)
        return out

    def never_called(self) -> list[str]:
        return [name for name in self.targets if name not in self.leader]

    def all_reduce(self) -> None:
        """Sum Grams and row counts over processes: one collective per distinct layer input, one for all counts."""
        if process_info()[1] == 1:
            return
        names = sorted(self.counts)
        for name in names:
            if name not in self.grams:
                self._fold_into_grams(name)
            self.grams[name] = sum_across_processes(self.grams[name])
        if names:
            counts = torch.tensor([self.counts[name] for name in names], device=self.grams[names[0]].device)
            for name, count in zip(names, sum_across_processes(counts).tolist(), strict=True):
                self.counts[name] = count

    def num_rows(self, leader: str, without: int | None = None) -> int:
        return sum(c for slot, c in enumerate(self.counts[leader]) if slot != without)

    def gram(self, leader: str, without: int | None = None) -> torch.Tensor:
        """sum x x^T over the rows of every slot but `without`."""
        if leader not in self.grams and leader not in self._totals:
            rows = self._stacked(leader, without)
            return rows.t() @ rows
        return mirror_upper(self._upper_gram(leader, without))

    def _upper_gram(self, leader: str, without: int | None) -> torch.Tensor:
        """`gram`'s upper triangle (the lower one holds whatever the slots summed there)."""
        if leader not in self._totals:
            self._totals[leader] = self.grams[leader].sum(0)
        total = self._totals[leader]
        return total if without is None else total - self.grams[leader][without]

    def space(self, leader: str, without: int | None = None, solver_dtype: torch.dtype | None = None) -> CleanSpace:
        """The clean space of every slot's rows but `without`'s: thin when built from fewer rows than d.

        `solver_dtype` is the dtype of a d x d eigendecomposition (the collector's by default).
        """
        if leader in self.grams or leader in self._totals:
            return CleanSpace.from_gram(self._upper_gram(leader, without), self.num_rows(leader, without), solver_dtype,
                                        upper=True)
        return CleanSpace.from_rows(self._stacked(leader, without))

    def release_folds(self, leader: str) -> None:
        """Keep only what `space(leader)` of every slot needs: the summed Gram (or the rows, while kept as rows)."""
        if leader in self.grams:
            self._upper_gram(leader, None)
            del self.grams[leader]

    def dim(self, leader: str) -> int:
        return self._dims[leader]

    def _stacked(self, leader: str, without: int | None) -> torch.Tensor:
        chunks = [rows for slot, kept in enumerate(self._kept[leader]) if slot != without for rows in kept]
        if not chunks:
            return torch.zeros(0, self._dims[leader], dtype=self.dtype)
        return torch.cat(chunks)
