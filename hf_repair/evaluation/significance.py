"""Is a candidate really better than the model it would replace? A paired test on the same held-out samples.

Selection on a few hundred verified samples is noisy: the best of a dozen candidates beats the
unrepaired model by a sample or two by chance alone. Both prediction sets are compared sample by
sample, and only the discordant pairs (one right, the other wrong) carry evidence:

- exact McNemar: under "no difference" each discordant pair is a fair coin, so the candidate's wins
  are Binomial(wins + losses, 1/2); the p-value is the exact one-sided tail P(at least this many wins).
- paired bootstrap: resampling the samples with replacement resamples the (win, loss, tie) counts
  from a multinomial with the observed shares, so the bootstrap distribution of the accuracy gain
  (W - L) / n is drawn from that multinomial directly (seeded, exact in distribution, O(resamples));
  its percentile interval is reported.

Both are computed for every comparison (the interval and the p-value are reported either way);
`test` only chooses which one decides `significant`.

The tests are one-sided: a candidate is adopted only when it is *better*, so the question is never
"different?". At `level` = 0.05 a candidate no better than the baseline is adopted at most 5% of the
time; a two-sided test at the same level would adopt at most 2.5% and miss real gains of a point or
two on 500 verified samples (measured in BENCHMARKS.md, fine-tuning regime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config.selection import SIGNIFICANCE_TESTS

if TYPE_CHECKING:
    from ..config import RepairConfig

BOOTSTRAP_RESAMPLES = 10_000

Correctness = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class PairedComparison:
    """A candidate's predictions against a baseline's on the same samples."""

    gain: float  # candidate accuracy minus baseline accuracy
    ci_low: float  # the two-sided (1 - level) paired bootstrap interval of the gain, as reported
    ci_high: float
    p_value: float  # exact McNemar, one-sided: P(at least `wins` wins by chance)
    significant: bool  # the chosen test finds the candidate better (always True with test="none": no test)
    n: int
    wins: int  # samples the candidate gets right and the baseline wrong
    losses: int  # samples the baseline gets right and the candidate wrong
    test: str
    level: float

    def as_metrics(self) -> dict[str, Any]:
        """The comparison as `RepairResult.metrics` entries (JSON-serialisable)."""
        return {
            "gain": self.gain,
            "gain_ci": [self.ci_low, self.ci_high],
            "p_value": self.p_value,
            "significant": self.significant,
            "significance_test": self.test,
            "significance_level": self.level,
            "wins": self.wins,
            "losses": self.losses,
        }

    def describe(self) -> str:
        """One line for logs and summaries."""
        return (f"gain {self.gain:+.4f} (CI {1 - self.level:.0%} [{self.ci_low:+.4f}, {self.ci_high:+.4f}]), "
                f"{self.wins} wins / {self.losses} losses of {self.n}, McNemar p = {self.p_value:.3g}")


def mcnemar_p_value(wins: int, losses: int) -> float:
    """Exact one-sided McNemar p-value: P(a fair coin gives at least `wins` of the wins + losses discordant pairs)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(wins, n + 1))
    return float(Fraction(tail, 2**n))  # exact integers: no underflow for large n


def bootstrap_gains(wins: int, losses: int, n: int, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """The accuracy gain of every paired bootstrap resample."""
    if n == 0:
        return np.zeros(1)
    shares = np.array([wins, losses, n - wins - losses], dtype=np.float64) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=resamples)
    return (counts[:, 0] - counts[:, 1]) / n


def bootstrap_gain_interval(wins: int, losses: int, n: int, level: float, seed: int,
                            resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """The two-sided (1 - level) percentile interval of the accuracy gain under the paired bootstrap."""
    low, high = np.quantile(bootstrap_gains(wins, losses, n, seed, resamples), [level / 2, 1 - level / 2])
    return float(low), float(high)


def compare_predictions(candidate_correct: Correctness, baseline_correct: Correctness, *, test: str = "mcnemar",
                        level: float = 0.05, seed: int = 0) -> PairedComparison:
    """Compare two per-sample correctness vectors (bool, same samples in the same order).

    `significant`: with "mcnemar", the exact one-sided McNemar p-value is below `level`; with "bootstrap",
    the one-sided (1 - level) lower bound of the bootstrap gain lies above zero; with "none", no test is
    applied (True). Both also need more wins than losses.
    """
    if test not in SIGNIFICANCE_TESTS:
        raise ValueError(f"Unknown significance test {test!r}; choose one of {list(SIGNIFICANCE_TESTS)}.")
    candidate, baseline = _as_bool(candidate_correct), _as_bool(baseline_correct)
    if candidate.shape != baseline.shape:
        raise ValueError(f"Paired predictions must cover the same samples, got {candidate.shape} and {baseline.shape}.")
    n = int(candidate.size)
    wins = int((candidate & ~baseline).sum())
    losses = int((baseline & ~candidate).sum())
    gain = (wins - losses) / n if n else 0.0
    p_value = mcnemar_p_value(wins, losses)
    ci_low, ci_high = bootstrap_gain_interval(wins, losses, n, level, seed)
    if test == "mcnemar":
        significant = wins > losses and p_value < level
    elif test == "bootstrap":
        significant = wins > losses and float(np.quantile(bootstrap_gains(wins, losses, n, seed), level)) > 0
    else:
        significant = True
    return PairedComparison(gain=gain, ci_low=ci_low, ci_high=ci_high, p_value=p_value, significant=significant,
                            n=n, wins=wins, losses=losses, test=test, level=level)


def significance_gate(candidate_correct: Correctness, baseline_correct: Correctness,
                      config: RepairConfig, level: float | None = None) -> PairedComparison:
    """`compare_predictions` with the config's `significance_test`, seed and `level` (default: `significance_level`).

    Every adoption decision calls this with the held-out predictions of the candidate and of the model
    it would replace; the candidate is adopted only if `.significant` (and its margin beats `min_improvement`).
    """
    return compare_predictions(candidate_correct, baseline_correct, test=config.significance_test,
                               level=config.significance_level if level is None else level, seed=config.repair_seed)


def _as_bool(values: Correctness) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(bool).reshape(-1)
