"""The clean activation space of one layer input: eigenbasis and energies of the verified rows.

The Gram G = sum x x^T of the rows equals R^T R for the stacked row matrix R (n x d), so its
eigenvectors are R's right singular vectors and its eigenvalues the squared singular values:
the same basis the published code gets from an SVD of R, in O(d^2) memory however many rows.

With fewer rows than dimensions (n < d: a 1568-wide layer and 1,000 verified images, a classifier
reading one pooled vector per sample) G has rank n at most. Then the space comes from the dual n x n
problem: the kernel K = R R^T = V S^2 V^T has G's nonzero eigenvalues, and U = R^T V S^-1 the matching
eigenvectors, in O(n^2 d) instead of O(d^3). The other d - n directions hold no energy: their
importance is 0 for every alpha, so such a "thin" space (basis d x m, m <= n) gives the same
projection M = U diag(lambda) U^T as the full one, and is what a saved repair stores.

On CPU the eigendecompositions run through SciPy's LAPACK (`syevd`, the divide-and-conquer driver
torch uses too): in the wheels measured here it took 0.6-0.7x torch's time at d = 3072
(BENCHMARKS.md, issue 13). Eigenvectors may differ in sign, which M does not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

# A thin space keeps the kernel's directions above this share of its largest eigenvalue (see `from_rows`).
DUAL_ENERGY_FLOOR = 1e-12


@dataclass
class CleanSpace:
    """Eigenbasis (columns of `basis`) and energies (descending) of one layer input.

    `basis` is d x d, or d x m with m < d for a thin space whose other directions have zero energy;
    `energies` has one entry per column.
    """

    basis: torch.Tensor
    energies: torch.Tensor
    num_rows: int

    @classmethod
    def from_gram(cls, gram: torch.Tensor, num_rows: int, solver_dtype: torch.dtype | None = None,
                  upper: bool = False) -> CleanSpace:
        """The eigendecomposition of `gram`, in `solver_dtype` if given (the basis keeps it; energies keep gram's dtype).

        With `upper`, only gram's upper triangle is read (how `GramCollector` sums it): the solver reads one
        triangle anyway, so no d x d pass is spent mirroring it.
        """
        if not upper:
            gram = 0.5 * (gram + gram.t())  # exact symmetry for eigh after float sums
        matrix = gram if solver_dtype is None else gram.to(solver_dtype)
        energies, basis = symmetric_eigh(matrix, upper=upper)
        energies = energies.flip(0).clamp_min(0.0).to(gram.dtype)  # round-off can leave tiny negatives
        return cls(basis=basis.flip(1), energies=energies, num_rows=num_rows)

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> CleanSpace:
        """The space of stacked rows (n x d): thin (d x m, m <= n) when n < d, from the dual kernel problem.

        The kernel's float64 eigenvalues carry round-off of about 1e-16 of the largest; directions below
        `DUAL_ENERGY_FLOOR` of it are dropped, since dividing by their singular values would turn that
        round-off into a basis vector (their importance is below alpha * 1e-12 at any alpha).
        A cheaper route than a QR factor of R^T (0.61-0.68x its time for 667-1,000 rows of 1568 in float64,
        BENCHMARKS.md, issue 13), with the dense Gram's projections to round-off (tests/projection/test_clean_space.py).
        """
        n, d = rows.shape
        if n == 0 or n >= d:
            return cls.from_gram(rows.t() @ rows, n)
        energies, vectors = symmetric_eigh(rows @ rows.t())
        energies, vectors = energies.flip(0), vectors.flip(1)
        keep = energies > DUAL_ENERGY_FLOOR * energies[0].clamp_min(0.0)
        if not bool(keep.any()):  # every row is zero: a space with no energy and no direction
            return cls(basis=rows.new_zeros(d, 0), energies=rows.new_zeros(0), num_rows=n)
        basis = (rows.t() @ vectors[:, keep]) / energies[keep].sqrt()
        return cls(basis=basis, energies=energies[keep], num_rows=n)

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
        return (self.basis * self.importance(alpha).to(self.basis.dtype)) @ self.basis.t()

    def rank(self, tol: float = 1e-10) -> int:
        if self.energies.numel() == 0 or self.energies[0] <= 0:
            return 0
        return int((self.energies > tol * self.energies[0]).sum())


def symmetric_eigh(matrix: torch.Tensor, upper: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix, as `torch.linalg.eigh`.

    Only the lower triangle is read, or the upper one with `upper`. A CPU float32/float64 matrix goes to
    SciPy's `syevd` (see the module docstring); anything else to torch.
    """
    if matrix.device.type != "cpu" or matrix.dtype not in (torch.float32, torch.float64):
        return torch.linalg.eigh(matrix, UPLO="U" if upper else "L")
    values, vectors = scipy.linalg.eigh(np.asarray(matrix.detach()), lower=not upper, driver="evd",
                                        check_finite=False)
    return torch.from_numpy(values), torch.from_numpy(np.ascontiguousarray(vectors))
