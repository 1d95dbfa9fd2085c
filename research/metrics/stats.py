"""Uncertainty for small image sets: every metric says how many images stand behind it and how sure it is.

Per-image metrics (CLIP score, style similarity, oracle accuracy, LPIPS per prompt) are summarised by a
percentile bootstrap of their mean. Set-level metrics (FID, IS) are bootstrapped by resampling images;
KID, whose unbiased estimator is distorted by duplicated images, by subsets drawn without replacement.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

CI_LEVEL = 0.95  # two-sided coverage of every reported interval


def _percentiles(draws: np.ndarray) -> list[float]:
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return [float(lo), float(hi)]


def summarize(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of per-image values with a percentile-bootstrap 95% interval: {"mean", "ci95", "n", "std"}."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("summarize() needs at least one value.")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return {"mean": float(v.mean()), "ci95": _percentiles(means), "n": int(v.size), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def bootstrap_sets(statistic: Callable[..., float], sets: Sequence[np.ndarray], n_boot: int = 100, seed: int = 0) -> list[float]:
    """95% percentile interval of statistic(*sets) when each set's rows (images) are resampled with replacement."""
    rng = np.random.default_rng(seed)
    draws = [statistic(*(s[rng.integers(0, len(s), len(s))] for s in sets)) for _ in range(n_boot)]
    return _percentiles(np.asarray(draws))


def subsample_ci(estimate: float, statistic: Callable[..., float], sets: Sequence[np.ndarray], size: int,
                 n_sub: int = 100, seed: int = 0) -> list[float]:
    """95% interval by subsampling (Politis & Romano): draw `size` rows of every set without replacement.

    The spread of a √n-consistent estimator at `size` rows, shrunk by √(size/n), stands in for its spread
    at the full n rows; under a degenerate null (KID ≈ 0) this errs on the wide side.
    """
    rng = np.random.default_rng(seed)
    n = min(len(s) for s in sets)
    draws = np.asarray([statistic(*(s[rng.choice(len(s), size, replace=False)] for s in sets)) for _ in range(n_sub)])
    lo, hi = _percentiles(draws - estimate)
    shrink = np.sqrt(size / n)
    return [float(estimate - hi * shrink), float(estimate - lo * shrink)]
