"""A small non-dominated filter for the report.

`search/pareto.py` has the search's own `pareto_front`; the report keeps this copy so that it works on
plain records and depends on nothing else in the project. Both follow the usual definition: a point is
dominated when another is at least as good on every objective and strictly better on at least one.
Exact duplicates do not dominate each other, so both stay on the front.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

DIRECTIONS = ("lower", "higher", "closer-to-zero")


def _loss(value: float, better: str) -> float:
    """The value turned into something where smaller is better."""
    if better == "lower":
        return value
    if better == "higher":
        return -value
    if better == "closer-to-zero":
        return abs(value)
    raise ValueError(f"unknown direction {better!r}; expected one of {', '.join(DIRECTIONS)}")


def front_indices(
    points: Sequence[Mapping], directions: Mapping[str, str], candidates: Sequence[int] | None = None
) -> list[int]:
    """Indices of the non-dominated points among `candidates` (default: all).

    `directions` maps each objective key of the points (e.g. "fairness", "utility") to "lower",
    "higher" or "closer-to-zero". Points with a missing or non-finite value on any objective take no
    part. The indices are ordered best-first on the first objective (ties: best-first on the next).
    """
    keys = list(directions)
    if not keys:
        raise ValueError("directions is empty: name at least one objective")
    pool = range(len(points)) if candidates is None else candidates
    losses: list[tuple[int, tuple[float, ...]]] = []
    for i in pool:
        try:
            row = tuple(_loss(float(points[i][k]), directions[k]) for k in keys)
        except (KeyError, TypeError):
            continue
        if all(math.isfinite(v) for v in row):
            losses.append((i, row))
    losses.sort(key=lambda item: (item[1], item[0]))
    # In this lexicographic order a dominator always comes first, and every dominated point is also
    # dominated by some front point, so comparing against the front found so far is enough.
    front: list[tuple[int, tuple[float, ...]]] = []
    for i, a in losses:
        dominated = any(
            all(bv <= av for av, bv in zip(a, b)) and any(bv < av for av, bv in zip(a, b))
            for _, b in front
        )
        if not dominated:
            front.append((i, a))
    return [i for i, _ in front]
