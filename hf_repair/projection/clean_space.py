"""The clean activation space of one layer input: eigenbasis and energies of the verified rows.

The Gram G = sum x x^T of the rows equals R R^T for the stacked row matrix R, so its
eigenvectors are R's left singular vectors and its eigenvalues the squared singular values:
the same basis the published code gets from an SVD of R, in O(d^2) memory however many rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CleanSpace:
    """Eigenbasis (columns of `basis`, d x d) and energies (descending) of one layer input."""

    basis: torch.Tensor
    energies: torch.Tensor
    num_rows: int

    @classmethod
    def from_gram(cls, gram: torch.Tensor, num_rows: int) -> CleanSpace:
        gram = 0.5 * (gram + gram.t())  # exact symmetry for eigh after float sums
        energies, basis = torch.linalg.eigh(gram)
        energies = energies.flip(0).clamp_min(0.0)  # round-off can leave tiny negatives
        return cls(basis=basis.flip(1), energies=energies, num_rows=num_rows)

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def importance(self, alpha: float) -> torch.Tensor:
        """lambda_i = alpha r_i / ((alpha - 1) r_i + 1), with r_i the direction's share of energy."""
        total = self.energies.sum()
        if total <= 0:
            return torch.zeros_like(self.energies)
        share = self.energies / total
        return alpha * share / ((alpha - 1.0) * share + 1.0)

    def projection(self, alpha: float) -> torch.Tensor:
        """M = U diag(lambda) U^T: keeps strong clean directions, suppresses the rest."""
        return (self.basis * self.importance(alpha)) @ self.basis.t()

    def rank(self, tol: float = 1e-10) -> int:
        if self.energies.numel() == 0 or self.energies[0] <= 0:
            return 0
        return int((self.energies > tol * self.energies[0]).sum())
