"""Non-dominated points for two objectives, each minimised or maximised.

Used to turn the pooled annealing candidates (and, later, the re-evaluated configurations) into the front the
report shows. O(n log n): sort by the first objective, sweep the second.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_SIGN = {"min": 1.0, "minimise": 1.0, "minimize": 1.0, "max": -1.0, "maximise": -1.0, "maximize": -1.0}


def _as_minimised(points, directions: Sequence[str]) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {pts.shape}")
    if len(directions) != 2 or any(d not in _SIGN for d in directions):
        raise ValueError(f"directions must be two of 'min'/'max', got {directions!r}")
    return pts * np.array([_SIGN[d] for d in directions])


def pareto_front(points, directions: Sequence[str] = ("min", "min")) -> np.ndarray:
    """Indices of the non-dominated points, ordered by the first objective (best first).

    A point is dominated when another is at least as good in both objectives and better in one; exact
    duplicates of a front point are all kept. Rows with a NaN are never on the front.
    """
    pts = _as_minimised(points, directions)
    ok = np.flatnonzero(~np.isnan(pts).any(1))
    order = ok[np.lexsort((pts[ok, 1], pts[ok, 0]))]
    front: list[int] = []
    best_second = np.inf
    for i in order:
        if pts[i, 1] < best_second or (front and (pts[i] == pts[front[-1]]).all()):
            front.append(int(i))
            best_second = min(best_second, pts[i, 1])
    return np.array(front, dtype=np.int64)


def nondominated_ranks(points, directions: Sequence[str] = ("min", "min")) -> np.ndarray:
    """Front number of every point (0 = the Pareto front, 1 = front once that is removed, ...); NaN rows get -1."""
    pts = np.asarray(points, dtype=np.float64)
    ranks = np.full(len(pts), -1, dtype=np.int64)
    left = np.flatnonzero(~np.isnan(pts).any(1)) if pts.ndim == 2 else np.arange(0)
    rank = 0
    while left.size:
        front = left[pareto_front(pts[left], directions)]
        ranks[front] = rank
        left = np.setdiff1d(left, front)
        rank += 1
    return ranks
