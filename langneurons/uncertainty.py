"""How sure a number is: intervals and paired tests for what the stages measure, from scipy and numpy (no
formula of our own where a library has it). Every resampling takes a seed: the same seed, the same interval."""
from __future__ import annotations

import zlib
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


# ---------------------------------------------------------------- perplexity over resampled lines

def derived_seed(seed: int, *names: str) -> int:
    """A seed of its own for each named part of one run (e.g. each language's resamples), all fixed by `seed`:
    independent draws for independent data, the same draws on a rerun."""
    words = [int(seed) & 0xFFFFFFFF, *(zlib.crc32(n.encode("utf-8")) for n in names)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def _line_arrays(line_nll: Sequence[float | None], line_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    # a line whose NLL is not finite was stored as null (files.json_safe): it is infinitely unlikely
    nll = np.asarray([np.inf if x is None else x for x in line_nll], dtype=np.float64)
    return nll, np.asarray(line_tokens, dtype=np.int64)


def ppl_of_lines(line_nll: Sequence[float | None], line_tokens: Sequence[int]) -> float:
    """PPL = exp(sum NLL / sum predicted tokens) of lines given by their summed NLL and predicted tokens; NaN
    when no token is predicted. metrics.perplexity computes its PPL with it."""
    nll, tok = _line_arrays(line_nll, line_tokens)
    count = int(tok.sum())
    return float(np.exp(nll.sum() / count)) if count else float("nan")


def resampled_ppl(line_nll: Sequence[float | None], line_tokens: Sequence[int], indices: np.ndarray,
                  chunk: int = 256) -> np.ndarray:
    """[resamples] PPL of the lines each row of `indices` ([resamples, n], resample_indices) draws (a line
    drawn twice counts twice); NaN where a resample predicts no token. Conditions measured on the same lines
    and given the same `indices` are paired resamples."""
    nll, tok = _line_arrays(line_nll, line_tokens)
    out = np.empty(len(indices), dtype=np.float64)
    for start in range(0, len(indices), chunk):  # [chunk, n] at a time: memory stays small for long files
        rows = indices[start:start + chunk]
        count = tok[rows].sum(1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out[start:start + chunk] = np.where(count > 0, np.exp(nll[rows].sum(1) / np.maximum(count, 1)), np.nan)
    return out


def interval_or_none(samples: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """percentile_interval as a JSON pair, None when no sample is finite (the statistic is never defined)."""
    lo, hi = percentile_interval(samples, level)
    return None if not (np.isfinite(lo) and np.isfinite(hi)) else [lo, hi]


# ---------------------------------------------------------------- accuracies and paired comparisons

ALPHA = 0.05       # a paired difference is marked significant when its p-value is below this
RESAMPLES = 2000   # bootstrap resamples of a paired comparison in the report


def significant(p: float | None, alpha: float = ALPHA) -> bool | None:
    """Whether a p-value marks a difference as significant (None: no test was possible)."""
    return None if p is None or not np.isfinite(p) else bool(p < alpha)


def accuracy_summary(correct: Sequence[int], level: float = LEVEL) -> dict:
    """accuracy, n and the Wilson interval `accuracy_ci` of per-item outcomes (1 right, 0 wrong)."""
    n, k = len(correct), int(sum(int(c) for c in correct))
    return {"accuracy": k / n if n else None, "n": n, "accuracy_ci": list(wilson(k, n, level))}


def paired_accuracy(before: Sequence[int], after: Sequence[int], resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> dict:
    """Two models scored on the same n items (outcome lists in item order): the difference after − before, the
    exact McNemar p-value on the discordant items, and a paired bootstrap interval of the difference (the same
    resampled items for both models)."""
    a, b = np.asarray(before, dtype=int), np.asarray(after, dtype=int)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired outcomes need two equal, non-empty lists (have {a.size} and {b.size} items)")
    only_before, only_after = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    d = (b - a).astype(float)
    p = mcnemar_exact(only_before, only_after)
    return {"n": int(a.size), "before": float(a.mean()), "after": float(b.mean()), "delta": float(d.mean()),
            "delta_ci": list(paired_bootstrap(lambda idx: float(d[idx].mean()), a.size, resamples, seed, level)),
            "only_before": only_before, "only_after": only_after, "p": p, "significant": significant(p)}


def paired_ppl_change(before_nll: Sequence[float], before_tokens: Sequence[int], after_nll: Sequence[float],
                      after_tokens: Sequence[int], resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict:
    """The change of perplexity after − before of two models on the same validation lines (per-line summed NLL
    and predicted-token counts, aligned), with a paired bootstrap interval over lines: every resample draws the
    same lines for both models. The lines must tokenize to the same counts in both (the same lines, the same
    tokenizer), else the two perplexities do not compare line for line."""
    bn, bt, an, at = (np.asarray(x, dtype=float) for x in (before_nll, before_tokens, after_nll, after_tokens))
    if not (bn.shape == bt.shape == an.shape == at.shape) or bn.ndim != 1 or bn.size == 0:
        raise ValueError("paired perplexity needs four aligned, non-empty per-line lists")
    if not np.array_equal(bt, at):
        raise ValueError("the two models predicted different numbers of tokens per line: not the same lines")
    before, after = ppl_of_lines(bn, bt), ppl_of_lines(an, at)
    idx = resample_indices(bn.size, resamples, seed)  # the same resampled lines for both models
    ci = percentile_interval(resampled_ppl(an, at, idx) - resampled_ppl(bn, bt, idx), level)
    return {"lines": int(bn.size), "before": before, "after": after, "delta": after - before, "delta_ci": list(ci),
            "significant": None if not all(np.isfinite(ci)) else bool(ci[0] > 0 or ci[1] < 0)}


def spread(values: Sequence[float]) -> dict:
    """mean, min, max and sample standard deviation (ddof 1; None for one value) of repeated measurements."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return {"n": 0, "mean": None, "min": None, "max": None, "sd": None}
    return {"n": int(x.size), "mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
            "sd": float(x.std(ddof=1)) if x.size > 1 else None}


def split_halves(n: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two [resamples, n // 2] index arrays: per resample a random permutation of n items cut into two disjoint
    halves (an odd item out is left out), for split-half agreement."""
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(n) for _ in range(resamples)]) if resamples else np.zeros((0, n), dtype=int)
    h = n // 2
    return perm[:, :h], perm[:, h:2 * h]


# ---------------------------------------------------------------- correlation across models

CORRELATIONS = ("pearson", "spearman")


def _correlation(x: np.ndarray, y: np.ndarray, method: str) -> float:
    """Pearson's r or Spearman's rho (scipy.stats); NaN where it is undefined (a constant sequence)."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    r = stats.pearsonr(x, y) if method == "pearson" else stats.spearmanr(x, y)
    return float(r.statistic)


def correlation(x: Sequence[float], y: Sequence[float], method: str = "pearson", resamples: int = RESAMPLES,
                seed: int = 0, level: float = LEVEL) -> dict:
    """Pearson's r or Spearman's rho of paired values (e.g. each model's shared ratio and its MGSM accuracy), with
    scipy's two-sided p-value and a percentile bootstrap interval over the pairs: each resample draws n pairs with
    replacement (seeded; the same seed, the same interval). A resample on which the statistic is undefined (every
    drawn x or every drawn y equal, likely with few models) is left out and counted in `undefined_resamples`.
    r, p and ci are None below 3 pairs or when x or y is constant; ci is None when no resample is defined."""
    if method not in CORRELATIONS:
        raise ValueError(f"correlation method '{method}': expected one of {', '.join(CORRELATIONS)}")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"correlation needs two equally long sequences (have {xs.size} and {ys.size})")
    out = {"method": method, "n": int(xs.size), "r": None, "p": None, "ci": None, "level": level,
           "resamples": resamples, "seed": seed, "undefined_resamples": None}
    r = _correlation(xs, ys, method) if xs.size >= 3 else float("nan")
    if not np.isfinite(r):
        return out
    p = stats.pearsonr(xs, ys).pvalue if method == "pearson" else stats.spearmanr(xs, ys).pvalue
    boot = np.array([_correlation(xs[idx], ys[idx], method) for idx in resample_indices(xs.size, resamples, seed)])
    return {**out, "r": r, "p": float(p), "ci": interval_or_none(boot, level),
            "undefined_resamples": int((~np.isfinite(boot)).sum())}
