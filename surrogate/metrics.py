"""Fit scores for surrogates, in plain numpy (scipy may be absent).

Spearman's rho is the one that matters most for annealing (it only needs the ranking of configurations to be
right); R^2 and MAE say whether the predicted *values* can be trusted against an absolute constraint.
"""
from __future__ import annotations

import numpy as np


def rankdata(values) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (scipy's 'average' method)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start index of each run of equal values, in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a, b) -> float:
    """Pearson correlation; nan when either side is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman's rho: Pearson correlation of the average-tie ranks."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.size != b.size:
        raise ValueError(f"spearman: lengths differ ({a.size} vs {b.size})")
    if a.size < 2:
        return float("nan")
    return pearson(rankdata(a), rankdata(b))


def r2(y_true, y_pred) -> float:
    """Coefficient of determination, 1 - SS_res / SS_tot (nan when y_true is constant)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    ss_tot = ((y - y.mean()) ** 2).sum()
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - ((y - p) ** 2).sum() / ss_tot)


def mae(y_true, y_pred) -> float:
    """Mean absolute error, in the target's units."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    return float(np.abs(y - p).mean())
