"""Metrics with a direction and a bootstrap 95% confidence interval, and paired intervals of changes.

Statistics are written as functions of bootstrap *weights* (how often each unit is drawn), so a ratio
such as s_DIS resamples whole items without a Python loop per replicate.

Every metric keeps the per-unit numbers it was computed from (`Units`): a product of weighted ratios,
optionally exponentiated, which covers means, BBQ's s_DIS and s_AMB and perplexity. Two measurements of
the same units (the unrepaired and the repaired model on the same prompts) are then resampled
*together* (`paired_change`): the same draws for both sides, so the interval of a change reflects how
much the change varies across items, not how much each side does on its own, and is much narrower
when the two sides are correlated, as before/after scores of one model always are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

N_BOOT = 1000
_CHUNK = 100


@dataclass(frozen=True)
class Units:
    """A metric as a function of per-unit numbers: prod_k (scale_k * sum(w * num_k) / sum(w * den_k)
    + offset_k), exponentiated when `exp`; `den` None means a plain mean. `w` are unit weights (all
    ones for the point value, multinomial counts for a bootstrap replicate)."""

    factors: tuple[tuple[np.ndarray, np.ndarray | None, float, float], ...]
    exp: bool = False
    zero_when_empty: bool = False  # a factor whose denominator is 0 makes the whole value 0 (s_AMB)

    @property
    def n(self) -> int:
        return len(self.factors[0][0])

    def statistic(self, w: np.ndarray) -> np.ndarray:
        out = np.ones(w.shape[0])
        empty = np.zeros(w.shape[0], dtype=bool)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for num, den, scale, offset in self.factors:
                d = w.sum(1) if den is None else w @ den
                empty |= d == 0
                out = out * (scale * (w @ num) / d + offset)
            if self.zero_when_empty:
                out = np.where(empty, 0.0, out)
            return np.exp(out) if self.exp else out

    def as_dict(self) -> dict:
        return {"factors": [[num.tolist(), None if den is None else den.tolist(), scale, offset]
                            for num, den, scale, offset in self.factors],
                "exp": self.exp, "zero_when_empty": self.zero_when_empty}

    @classmethod
    def from_dict(cls, d: dict) -> "Units":
        return cls(tuple((np.asarray(num, np.float64), None if den is None else np.asarray(den, np.float64), scale, offset)
                         for num, den, scale, offset in d["factors"]), d["exp"], d["zero_when_empty"])


@dataclass(frozen=True)
class Metric:
    value: float
    ci_low: float
    ci_high: float
    better: Literal["lower", "higher", "closer-to-zero", "closer-to-half", "reference"]  # reference: no direction
    n: int
    units: Units | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "better": self.better, "n": self.n}


def _weights(n_units: int, n_boot: int, seed: int):
    """Bootstrap weight matrices, chunk by chunk; the same (n_units, n_boot, seed) gives the same draws,
    which is what pairs two measurements of the same units."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        weights = np.zeros((b, n_units), dtype=np.float64)
        np.add.at(weights, (np.repeat(np.arange(b), n_units), draws.ravel()), 1.0)
        yield weights


def replicates(statistic: Callable[[np.ndarray], np.ndarray], n_units: int, *, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """`statistic` under `n_boot` item resamplings, shape (n_boot,)."""
    return np.concatenate([statistic(w) for w in _weights(n_units, n_boot, seed)])


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
    return (value, *_percentiles(replicates(statistic, n_units, n_boot=n_boot, seed=seed)))


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def units_metric(units: Units, better, *, n: int | None = None, seed: int = 0) -> Metric:
    value, low, high = bootstrap(units.statistic, units.n, seed=seed)
    return Metric(value, low, high, better, units.n if n is None else n, units)


def mean_metric(values, better, *, seed: int = 0) -> Metric:
    """Mean of per-unit values with a bootstrap interval."""
    return units_metric(Units(((np.asarray(values, dtype=np.float64), None, 1.0, 0.0),)), better, seed=seed)


def clustered_mean_metric(values, clusters, better, *, seed: int = 0) -> Metric:
    """Mean of per-item values, resampled by cluster (items of one cluster are drawn together): the
    frames of one association concept are correlated, so resampling them one by one would make the
    interval too narrow. The point value is the plain mean; `n` counts items."""
    values = np.asarray(values, dtype=np.float64)
    keys, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    num = np.bincount(index, weights=values, minlength=len(keys))
    den = np.bincount(index, minlength=len(keys)).astype(np.float64)
    return units_metric(Units(((num, den, 1.0, 0.0),)), better, n=len(values), seed=seed)


def ratio_metric(numerator, denominator, better, *, scale: float = 1.0, offset: float = 0.0, seed: int = 0) -> Metric:
    """scale * sum(numerator) / sum(denominator) + offset, resampling units together."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    return units_metric(Units(((num, den, scale, offset),)), better, seed=seed)


@dataclass(frozen=True)
class Change:
    """after - before and after / before - 1, each with a paired bootstrap 95% interval."""

    before: float
    after: float
    delta: float
    delta_ci: tuple[float, float]
    relative: float
    relative_ci: tuple[float, float]
    # the relative change means something only when the before side's replicates keep one sign (a signed
    # metric near 0, such as the pairs' mean gap, gives ratios without meaning); else show delta
    relative_defined: bool = True

    @property
    def significant(self) -> bool:
        """The interval of the change excludes zero."""
        lo, hi = self.delta_ci
        return bool(lo > 0 or hi < 0)

    def as_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "delta": self.delta, "delta_ci": list(self.delta_ci),
                "relative": self.relative, "relative_ci": list(self.relative_ci), "significant": self.significant,
                "relative_defined": self.relative_defined}


def change_from_replicates(before: float, after: float, rep_before: np.ndarray, rep_after: np.ndarray) -> Change:
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = rep_after / rep_before - 1
        relative = after / before - 1 if before else float("nan")
    finite = rep_before[np.isfinite(rep_before)]
    defined = bool(before) and bool(np.all(finite > 0) or np.all(finite < 0))
    return Change(before, after, after - before, _percentiles(rep_after - rep_before), relative, _percentiles(rel), defined)


def metric_seed(name: str, seed: int = 0) -> int:
    """The bootstrap seed of one metric's paired resampling: the same for both sides of a change (that
    is the pairing), different between metrics so that separate item sets are drawn independently."""
    import zlib

    return seed + zlib.crc32(name.encode("utf-8"))


def paired_change(before: Units, after: Units, *, n_boot: int = N_BOOT, seed: int = 0) -> Change:
    """The change from `before` to `after`, two measurements of the same units, with intervals from
    resampling the units once for both sides."""
    if before.n != after.n:
        raise ValueError(f"paired measurements need the same units, got {before.n} and {after.n}")
    ones = np.ones((1, before.n))
    return change_from_replicates(float(before.statistic(ones)[0]), float(after.statistic(ones)[0]),
                                  replicates(before.statistic, before.n, n_boot=n_boot, seed=seed),
                                  replicates(after.statistic, after.n, n_boot=n_boot, seed=seed))


def format_change(change: dict | None, compact: bool = False) -> str:
    """'-7.4% [-9.1%, -5.6%] *': a Change (as_dict) relative, with its paired 95% interval, '*' when
    that interval excludes zero; the absolute change ('-0.69 [-1.25, -0.31] *') where a relative one
    has no meaning (`Change.relative_defined`); 'n/a' without one. `compact` (the console summary's
    80 columns): '-7.4% [-9.1, -5.6] *', the interval's bounds in percent, an absolute change to two
    significant digits and without the word '(absolute)' (it has no % sign)."""
    if not change:
        return "n/a"
    mark = " *" if change["significant"] else ""
    if not change.get("relative_defined", True):
        lo, hi = change["delta_ci"]
        digits, word = ("+.2g", "") if compact else ("+.4g", " (absolute)")
        return f"{change['delta']:{digits}} [{lo:{digits}}, {hi:{digits}}]{word}{mark}"
    lo, hi = change["relative_ci"]
    bounds = f"{100 * lo:+.1f}, {100 * hi:+.1f}" if compact else f"{lo:+.1%}, {hi:+.1%}"
    return f"{change['relative']:+.1%} [{bounds}]{mark}"
