"""Checks and normalises the plain records a report is built from, and writes the front as CSV and JSON.

A point record:
    {"name": str, "method": str, "kind": "base"|"candidate"|"chosen"|"baseline"|"best",
     "fairness": float, "utility": float,
     "fairness_ci": [lo, hi] | None, "utility_ci": [lo, hi] | None,   # optional, default None
     "split": "report"|"search"|"select",                              # optional, default "report"
     "config": dict,                                                   # optional, e.g. {"pruned_heads": [[l, h], ...]}
     "front": bool}                                                    # optional, see choose_front
"""
from __future__ import annotations

import csv
import io
import json
import math
from numbers import Real
from typing import Mapping, Sequence

from reports.pareto import DIRECTIONS, front_indices

KINDS = ("base", "candidate", "chosen", "baseline", "best")  # best: a method's best, not the chosen one
SPLITS = ("report", "search", "select")
OBJECTIVES = ("fairness", "utility")
CSV_COLUMNS = (
    "name", "method", "kind",
    "fairness", "fairness_ci_low", "fairness_ci_high",
    "utility", "utility_ci_low", "utility_ci_high",
    "n_pruned",
)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_objectives(objectives: Mapping) -> dict:
    """{"fairness": {"name", "better"}, "utility": {...}} with both present and a known direction."""
    if not isinstance(objectives, Mapping):
        raise ValueError("objectives must be a dict with 'fairness' and 'utility' entries")
    out = {}
    for key in OBJECTIVES:
        spec = objectives.get(key)
        if not isinstance(spec, Mapping):
            raise ValueError(f"objectives[{key!r}] is missing; give {{'name': ..., 'better': 'lower'|'higher'}}")
        better = spec.get("better")
        if better not in DIRECTIONS:
            raise ValueError(
                f"objectives[{key!r}]['better'] is {better!r}; expected one of {', '.join(DIRECTIONS)}"
            )
        out[key] = {**spec, "name": str(spec.get("name") or key), "better": better}
    return out


def _ci(value, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):  # a numpy array
        value = value.tolist()
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(_is_number(v) for v in value)
    ):
        raise ValueError(f"{where} must be [lo, hi] (two numbers) or None, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return (min(lo, hi), max(lo, hi))


def check_points(points: Sequence[Mapping]) -> list[dict]:
    """Copies of the points with defaults filled in; ValueError naming the point on a bad field."""
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, Mapping):
            raise ValueError(f"points[{i}] must be a dict, got {type(p).__name__}")
        name = p.get("name")
        where = f"points[{i}] ({name!r})"
        if not isinstance(name, str) or not name:
            raise ValueError(f"points[{i}] needs a non-empty string 'name'")
        if not isinstance(p.get("method"), str) or not p["method"]:
            raise ValueError(f"{where} needs a non-empty string 'method'")
        if p.get("kind") not in KINDS:
            raise ValueError(f"{where}: kind is {p.get('kind')!r}; expected one of {', '.join(KINDS)}")
        split = p.get("split", "report")
        if split not in SPLITS:
            raise ValueError(f"{where}: split is {split!r}; expected one of {', '.join(SPLITS)}")
        q = dict(p)
        for key in OBJECTIVES:
            if not _is_number(p.get(key)):
                raise ValueError(f"{where}: {key} must be a number, got {p.get(key)!r}")
            q[key] = float(p[key])
            q[f"{key}_ci"] = _ci(p.get(f"{key}_ci"), f"{where}: {key}_ci")
        config = p.get("config")
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ValueError(f"{where}: config must be a dict, got {type(config).__name__}")
        if "front" in p and not isinstance(p["front"], bool):
            raise ValueError(f"{where}: front must be true or false, got {p['front']!r}")
        q.update(split=split, config=dict(config))
        out.append(q)
    return out


def plottable(point: Mapping) -> bool:
    return all(math.isfinite(point[key]) for key in OBJECTIVES)


def choose_front(points: Sequence[Mapping], objectives: Mapping) -> list[int]:
    """Indices of the front points, best fairness first.

    If any point carries a "front" flag, the flags decide (a point without one is off the front).
    Otherwise the front is the non-dominated set of the plottable points of the "report" split, or of
    all plottable points when none is on the report split: values measured on different splits are
    not compared with each other.
    """
    directions = {key: objectives[key]["better"] for key in OBJECTIVES}
    if any("front" in p for p in points):
        chosen = [i for i, p in enumerate(points) if p.get("front") and plottable(p)]
        order = front_indices(points, directions, chosen)  # for the ordering only
        placed = set(order)
        return order + [i for i in chosen if i not in placed]
    usable = [i for i, p in enumerate(points) if plottable(p)]
    on_report = [i for i in usable if points[i]["split"] == "report"]
    return front_indices(points, directions, on_report or usable)


def n_pruned(point: Mapping) -> int | None:
    heads = point.get("config", {}).get("pruned_heads")
    return len(heads) if isinstance(heads, (list, tuple)) else None


def csv_text(front: Sequence[Mapping]) -> str:
    """One row per front point; empty cells where there is no CI or no pruned_heads."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in front:
        row = [p["name"], p["method"], p["kind"]]
        for key in OBJECTIVES:
            ci = p[f"{key}_ci"]
            row += [repr(p[key]), "" if ci is None else repr(ci[0]), "" if ci is None else repr(ci[1])]
        count = n_pruned(p)
        row.append("" if count is None else count)
        writer.writerow(row)
    return buffer.getvalue()


def jsonable(value):
    """Plain JSON values: non-finite floats become null, tuples and arrays become lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    if _is_number(value):
        return jsonable(float(value))
    return str(value)


def json_text(
    objectives: Mapping, points: Sequence[Mapping], front: Sequence[int], *, title: str, meta: Mapping
) -> str:
    """{"title", "objectives", "front": [front points, best fairness first], "points": [all], "meta"}.

    Every record gains "n_pruned" (null without pruned_heads) and "on_front".
    """
    on_front = set(front)

    def record(i):
        return {**points[i], "n_pruned": n_pruned(points[i]), "on_front": i in on_front}

    doc = {
        "title": title,
        "objectives": objectives,
        "front": [record(i) for i in front],
        "points": [record(i) for i in range(len(points))],
        "meta": meta,
    }
    return json.dumps(jsonable(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def check_fits(fits: Sequence[Mapping]) -> list[dict]:
    """Copies of the fit records; ValueError on an unknown objective or mismatched lengths."""
    out = []
    for i, f in enumerate(fits or ()):
        if not isinstance(f, Mapping):
            raise ValueError(f"fits[{i}] must be a dict, got {type(f).__name__}")
        if f.get("objective") not in OBJECTIVES:
            raise ValueError(f"fits[{i}]: objective is {f.get('objective')!r}; expected 'fairness' or 'utility'")
        predicted, measured = (
            list(f[key]) if f.get(key) is not None else [] for key in ("predicted", "measured")
        )
        if len(predicted) != len(measured):
            raise ValueError(
                f"fits[{i}] ({f['objective']}): {len(predicted)} predicted values but {len(measured)} measured"
            )
        if not all(_is_number(v) for v in predicted + measured):
            raise ValueError(f"fits[{i}] ({f['objective']}): predicted and measured must hold numbers only")
        scores = f.get("scores") or {}
        if not isinstance(scores, Mapping):
            raise ValueError(f"fits[{i}] ({f['objective']}): scores must be a dict")
        out.append({**f, "predicted": [float(v) for v in predicted], "measured": [float(v) for v in measured],
                    "scores": dict(scores)})
    return out


def describe_config(point: Mapping) -> str:
    """A configuration in a few words, for cards and tooltips: the description the run wrote beside the
    point (its method's own, repair.methods.describe); "" for none."""
    return str(point.get("description") or "")
