"""The statistics behind the claim verdicts: differences over seeds with a 95% confidence interval.

Rule (stated in every report): a difference A − B is computed **paired by seed** when A and B share at least two
seeds (mean of the per-seed differences, Student-t interval with n−1 degrees of freedom), else **unpaired** (Welch
interval). Student-t rather than a percentile bootstrap: with the 3 seeds a sweep usually has, a percentile bootstrap
of 3 values spans only their min..max and would call any three same-signed differences significant; the t interval
(t₀.₉₇₅ = 4.30 at 2 df) is the conservative one. The bootstrap interval is given beside it for reference.
With fewer than 2 values on a side there is no interval and every verdict that needs one is ``inconclusive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Diff:
    """A − B over seeds."""

    mean: float
    lo: float  # lower end of the 95% CI (NaN when there is none)
    hi: float
    n: int  # paired: number of common seeds; unpaired: min(n_A, n_B)
    paired: bool
    boot_lo: float = math.nan
    boot_hi: float = math.nan

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def above_zero(self) -> bool:
        return self.has_ci and self.lo > 0

    @property
    def below_zero(self) -> bool:
        return self.has_ci and self.hi < 0

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """JSON-ready (no interval: None, never NaN)."""

        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "mean": num(self.mean),
            "ci_lo": num(self.lo),
            "ci_hi": num(self.hi),
            "bootstrap_lo": num(self.boot_lo),
            "bootstrap_hi": num(self.boot_hi),
            "paired": self.paired,
            "n": self.n,
        }

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "–"
        ci = f" [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]" if self.has_ci else " [no CI]"
        return f"{self.mean:+.{digits}f}{ci} ({'paired' if self.paired else 'unpaired'}, n={self.n})"


def diff(a: dict[int, float], b: dict[int, float]) -> Diff:
    """A − B from seed -> value maps (see the module docstring for the rule)."""
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        d = np.array([a[s] - b[s] for s in common], dtype=float)
        lo, hi = t_interval(d)
        blo, bhi = bootstrap_interval(d)
        return Diff(float(d.mean()), lo, hi, len(common), True, blo, bhi)
    xa, xb = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
    if len(xa) == 0 or len(xb) == 0:
        return Diff(math.nan, math.nan, math.nan, 0, False)
    m = float(xa.mean() - xb.mean())
    if len(xa) < 2 or len(xb) < 2:
        return Diff(m, math.nan, math.nan, min(len(xa), len(xb)), False)
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return Diff(m, m, m, min(len(xa), len(xb)), False)
    dof = (va + vb) ** 2 / ((va**2 / (len(xa) - 1) if va else 0) + (vb**2 / (len(xb) - 1) if vb else 0))
    t = st.t.ppf(0.5 + CONFIDENCE / 2, dof)
    return Diff(m, m - t * se, m + t * se, min(len(xa), len(xb)), False)


def t_interval(d: np.ndarray) -> tuple[float, float]:
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    m, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    t = st.t.ppf(0.5 + CONFIDENCE / 2, n - 1)
    return m - t * se, m + t * se


def bootstrap_interval(d: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean (fixed seed: the same report twice gives the same numbers)."""
    if len(d) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = rng.choice(d, size=(BOOTSTRAP_RESAMPLES, len(d)), replace=True).mean(axis=1)
    a = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (NaN when fewer than 3 points or x is constant)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    r = st.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def cv(values: np.ndarray) -> float:
    """Coefficient of variation std/mean (unbiased std, as the importance loss computes it; spec §1.9)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or values.mean() == 0:
        return math.nan
    return float(values.std(ddof=1) / values.mean())


__all__ = ["BOOTSTRAP_RESAMPLES", "CONFIDENCE", "Diff", "bootstrap_interval", "cv", "diff", "spearman", "t_interval"]
