"""How sure a number is: intervals and paired tests for what the stages measure, from scipy and numpy (no
formula of our own where a library has it). Every resampling takes a seed: the same seed, the same interval."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n ((0, 1) when n is 0: nothing is known)."""
    if n == 0:
        return 0.0, 1.0
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of paired outcomes: `only_a` items right under A only, `only_b` under B
    only (the items both get right or both get wrong carry no information about the difference)."""
    n = int(only_a) + int(only_b)
    return 1.0 if n == 0 else float(stats.binomtest(int(only_a), n, 0.5).pvalue)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] indices drawn with replacement (a bootstrap over n paired items)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of bootstrap samples (non-finite samples left out)."""
    x = np.asarray(samples, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int,
                     level: float = LEVEL) -> tuple[float, float]:
    """Interval of `statistic(indices)` over bootstrap resamples of n paired items: the same items are drawn
    for every condition the statistic compares (the same validation lines with and without a set)."""
    return percentile_interval([statistic(idx) for idx in resample_indices(n, resamples, seed)], level)


def split_halves(n: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two [resamples, n // 2] index arrays: per resample a random permutation of n items cut into two disjoint
    halves (an odd item out is left out), for split-half agreement."""
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(n) for _ in range(resamples)]) if resamples else np.zeros((0, n), dtype=int)
    h = n // 2
    return perm[:, :h], perm[:, h:2 * h]
