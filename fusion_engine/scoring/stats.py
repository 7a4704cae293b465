"""Bootstrap confidence intervals for means and paired differences (numpy only, seeded)."""
from __future__ import annotations

import numpy as np

from ..errors import OptionError

RESAMPLES = 10000


def bootstrap_ci(values, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap ``level`` interval over the values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def paired_difference_ci(a, b, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0):
    """(mean of a - b, low, high) for values paired by position (the same seeds): resamples the pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise OptionError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, level, resamples, seed)


def excludes_zero(ci) -> int:
    """+1 if the interval lies above zero, -1 if below, 0 if it contains zero."""
    _, low, high = ci
    return 1 if low > 0 else -1 if high < 0 else 0
