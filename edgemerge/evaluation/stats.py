"""Paired bootstrap intervals and the verdict words the reports may use.

Two rows scored on the same cases are compared case by case: the statistic is the
mean of the per-case differences, and its 95% interval comes from resampling the
cases with replacement (a percentile bootstrap). A report says "beats" or "loses"
only when that interval excludes zero, and "ties" otherwise; on scores where lower
is better (an NLL) the words follow the better direction, not the sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["beats", "ties", "loses"]
N_BOOT = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class PairedInterval:
    """``mean(a - b)`` over paired cases and its bootstrap interval.

    Attributes:
        diff: mean over cases of ``a[i] - b[i]``.
        lo, hi: the ``level`` percentile interval of that mean.
        n: number of paired cases.
        level: coverage of the interval (0.95).
    """

    diff: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    def verdict(self, *, higher_is_better: bool = True) -> Verdict:
        """How ``a`` stands against ``b``: "beats" or "loses" only outside the interval."""
        if self.lo > 0.0:
            return "beats" if higher_is_better else "loses"
        if self.hi < 0.0:
            return "loses" if higher_is_better else "beats"
        return "ties"

    def format(self, digits: int = 2) -> str:
        """``+0.12 [+0.03, +0.21]``."""
        return f"{self.diff:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> PairedInterval:
    """Percentile-bootstrap interval of ``mean(a - b)``, resampling cases jointly.

    Args:
        a, b: one score per case, shape ``[n]`` each, case ``i`` of ``a`` paired with
            case ``i`` of ``b``; finite.
        n_boot: bootstrap resamples.
        level: interval coverage in (0, 1).
        seed: the resampling generator's seed (the same inputs give the same interval).

    Raises:
        ValueError: shapes differ, fewer than two cases, a non-finite score, or a bad
            ``n_boot`` / ``level``.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired scores need equal 1-D shapes, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a paired interval needs at least 2 cases, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired scores must be finite (a NaN or inf score was given)")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = x - y
    rng = np.random.default_rng(seed)
    # resample in slabs so a large n_boot x n never needs one huge index array
    means = np.empty(n_boot)
    slab = max(1, 2_000_000 // d.size)
    for start in range(0, n_boot, slab):
        stop = min(n_boot, start + slab)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return PairedInterval(float(d.mean()), float(lo), float(hi), int(d.size), level)
