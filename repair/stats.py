"""Metrics with a direction and a bootstrap 95% confidence interval.

Statistics are written as functions of bootstrap *weights* (how often each unit is drawn), so a ratio
such as s_DIS resamples whole items without a Python loop per replicate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal

import numpy as np

N_BOOT = 1000
_CHUNK = 100


@dataclass(frozen=True)
class Metric:
    value: float
    ci_low: float
    ci_high: float
    better: Literal["lower", "higher", "closer-to-zero"]
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    n_units: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Return (value, 2.5th percentile, 97.5th percentile) of `statistic` under item resampling.

    `statistic(w)` takes a weight matrix w of shape (b, n_units) (multinomial counts, one row per
    replicate) and returns b values; it is also called once with all-ones weights for the point value.
    """
    if n_units == 0:
        return float("nan"), float("nan"), float("nan")
    value = float(statistic(np.ones((1, n_units), dtype=np.float64))[0])
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        weights = np.zeros((b, n_units), dtype=np.float64)
        np.add.at(weights, (np.repeat(np.arange(b), n_units), draws.ravel()), 1.0)
        samples.append(statistic(weights))
    samples = np.concatenate(samples)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return value, float("nan"), float("nan")
    low, high = np.percentile(samples, [2.5, 97.5])
    return value, float(low), float(high)


def mean_metric(values, better, *, seed: int = 0) -> Metric:
    """Mean of per-unit values with a bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    value, low, high = bootstrap(lambda w: (w @ values) / w.sum(1), len(values), seed=seed)
    return Metric(value, low, high, better, len(values))


def ratio_metric(numerator, denominator, better, *, scale: float = 1.0, offset: float = 0.0, seed: int = 0) -> Metric:
    """scale * sum(numerator) / sum(denominator) + offset, resampling units together."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)

    def stat(w):
        with np.errstate(invalid="ignore", divide="ignore"):
            return scale * (w @ num) / (w @ den) + offset

    value, low, high = bootstrap(stat, len(num), seed=seed)
    return Metric(value, low, high, better, len(num))
