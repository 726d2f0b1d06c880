"""The report's two kinds of figure, as inline SVG: the fairness/utility trade-off and a surrogate fit.

In the trade-off plot every plotted point is exactly one <circle>; legend swatches and the rings that
mark the base model and the chosen checkpoint are <path>s, so the circles can be counted.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Mapping, Sequence

from reports.svg import INK, MUTED, Axis, disc_path, domain, esc, fmt, frame, num, square_path, star_path, svg
from reports.records import describe_config

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
METHOD_COLOURS = {"prune": "#0072B2", "search": "#0072B2", "random": "#E69F00", "knockout": "#009E73", "base": "#6e7781",
                  "fairmed": "#D55E00", "fairsteer": "#CC79A7", "experts": "#56B4E9", "stack": "#000000"}
SPARE_COLOURS = ("#D55E00", "#CC79A7", "#56B4E9", "#8c6d31", "#000000", "#7f3c8d")
FRONT_COLOUR = "#1f2328"
CHOSEN_COLOUR = "#c9302c"
BASE_COLOUR = "#1f2328"


def method_colours(points: Sequence[Mapping]) -> dict[str, str]:
    """A colour per method, stable for the known methods, in order of first appearance otherwise."""
    colours: dict[str, str] = {}
    known = {p["method"]: METHOD_COLOURS[p["method"]] for p in points if p["method"] in METHOD_COLOURS}
    spare = iter(c for c in SPARE_COLOURS if c not in known.values())
    for p in points:
        method = p["method"]
        if method not in colours:
            colours[method] = known.get(method) or next(spare, "#444444")
    return colours


def direction_words(better: str) -> str:
    return {"lower": "lower is better", "higher": "higher is better", "closer-to-zero": "closer to zero is better"}[better]


def axis_title(role: str, spec: Mapping) -> str:
    return f"{role}: {spec['name']} ({direction_words(spec['better'])})"


def _ci_text(value: float, ci) -> str:
    return fmt(value) if ci is None else f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _tooltip(p: Mapping, on_front: bool) -> str:
    lines = [
        f"{p['name']} ({p['method']}, {p['kind']}, {p['split']} split)" + (", on the front" if on_front else ""),
        f"fairness {_ci_text(p['fairness'], p['fairness_ci'])}",
        f"utility {_ci_text(p['utility'], p['utility_ci'])}",
    ]
    for key in ("fairness", "utility"):
        c = (p.get("changes") or {}).get(key)
        if isinstance(c, Mapping) and c.get("relative_ci"):
            lines.append(f"{key} change {c['relative']:+.1%} [{c['relative_ci'][0]:+.1%}, {c['relative_ci'][1]:+.1%}] "
                         "(paired 95% CI)")
    described = describe_config(p)
    if described:
        lines.append(described)
    return "\n".join(lines)


def front_figure(
    points: Sequence[Mapping], front: Sequence[int], objectives: Mapping, *, element_id: str = "fig-front"
) -> str:
    """Scatter of fairness (x) against utility (y), the front joined by a line, every point named
    beside it by what it does, the base model and the chosen checkpoint marked, one colour per method.

    When every point carries its paired change against the unrepaired model (a run's report), the axes
    are those changes with their paired 95% intervals and the unrepaired model sits at 0: an unpaired
    interval spans the spread of the items and overlaps every point, while the paired one shows what
    the repair itself changed. Records without changes are drawn on their values and intervals."""
    width, height = 1000, 540
    left, right, top, bottom = 96, 740, 20, 476
    shown = [i for i, p in enumerate(points) if math.isfinite(p["fairness"]) and math.isfinite(p["utility"])]
    on_front = set(front)
    view, units = paired_view(points, shown)

    def extent(key):
        values = []
        for i in shown:
            values.append(view[i][key])
            if view[i][f"{key}_ci"] is not None:
                values.extend(view[i][f"{key}_ci"])
        return domain(values)

    x = Axis(*extent("fairness"), left, right)
    y = Axis(*extent("utility"), bottom, top)
    colours = method_colours([points[i] for i in shown])
    titles = [axis_title(role, objectives[key]) if units is None else
              f"{role}: {objectives[key]['name']}, change vs unrepaired{units[key]} ({direction_words(objectives[key]['better'])})"
              for role, key in (("Fairness", "fairness"), ("Utility", "utility"))]
    body = frame(x, y, *titles)
    if units is not None:  # the unrepaired model's lines: where a change is zero
        body.append(f'<path class="zero" d="M{num(x(0))},{top}V{bottom}M{left},{num(y(0))}H{right}" stroke="{MUTED}" '
                    'stroke-dasharray="4 3" stroke-width="1"/>')

    # Error bars first, so markers sit on top of them.
    body.append('<g class="errorbars" fill="none" stroke-width="1" opacity="0.55">')
    for i in shown:
        p = view[i]
        parts = []
        px, py = x(p["fairness"]), y(p["utility"])
        if p["fairness_ci"] is not None:
            a, b = (x(v) for v in p["fairness_ci"])
            parts.append(f"M{num(a)},{num(py)}H{num(b)}M{num(a)},{num(py - 3)}v6M{num(b)},{num(py - 3)}v6")
        if p["utility_ci"] is not None:
            a, b = (y(v) for v in p["utility_ci"])
            parts.append(f"M{num(px)},{num(a)}V{num(b)}M{num(px - 3)},{num(a)}h6M{num(px - 3)},{num(b)}h6")
        if parts:
            body.append(f'<path d="{"".join(parts)}" stroke="{colours[p["method"]]}"/>')
    body.append("</g>")

    # The front, joined in order of fairness.
    line = sorted(front, key=lambda i: (view[i]["fairness"], view[i]["utility"]))
    if len(line) > 1:
        coords = " ".join(f"{num(x(view[i]['fairness']))},{num(y(view[i]['utility']))}" for i in line)
        body.append(
            f'<polyline class="front-line" points="{coords}" fill="none" stroke="{FRONT_COLOUR}" '
            f'stroke-width="1.75" stroke-linejoin="round" opacity="0.8"/>'
        )

    # Points: off-front first, front on top; hollow when measured on the search split.
    body.append('<g class="points">')
    for i in sorted(shown, key=lambda i: (i in on_front, i)):
        p = view[i]
        colour = colours[p["method"]]
        fill = "#ffffff" if p["split"] == "search" else colour
        if i in on_front:
            attrs = f'r="5.5" fill="{fill}" stroke="{FRONT_COLOUR}" stroke-width="1.6"'
        elif p["split"] == "search":
            attrs = f'r="4" fill="{fill}" stroke="{colour}" stroke-width="1.4"'
        else:
            attrs = f'r="4" fill="{fill}" fill-opacity="0.8" stroke="#ffffff" stroke-width="0.8"'
        cls = "point front" if i in on_front else "point"
        body.append(
            f'<circle class="{cls}" data-name="{esc(p["name"])}" cx="{num(x(p["fairness"]))}" '
            f'cy="{num(y(p["utility"]))}" {attrs}><title>{esc(_tooltip(points[i], i in on_front))}</title></circle>'
        )
    body.append("</g>")

    # Base model and chosen checkpoint: a square / a star around the point; each method's best
    # (several methods in one run): a ring in its colour.
    body.append('<g class="markers">')
    for i in shown:
        p = view[i]
        px, py = x(p["fairness"]), y(p["utility"])
        if p["kind"] == "best":
            body.append(f'<path d="{disc_path(px, py, 9)}" fill="none" stroke="{colours[p["method"]]}" stroke-width="2"/>')
        elif p["kind"] == "base":
            body.append(f'<path d="{square_path(px, py, 9)}" fill="none" stroke="{BASE_COLOUR}" stroke-width="2"/>')
        elif p["kind"] == "chosen":
            body.append(f'<path d="{star_path(px, py, 15)}" fill="none" stroke="{CHOSEN_COLOUR}" stroke-width="2" '
                        'stroke-linejoin="round"/>')
    body.append("</g>")
    labels, crowded = point_labels(view, shown, x, y, (left, top, right, bottom))
    body.extend(labels)

    body.extend(_legend(points, shown, colours, on_front, right + 24, top + 4))
    label = (
        f"Scatter of {len(shown)} configurations, fairness against utility"
        + (", as paired changes against the unrepaired model" if units is not None else "")
        + f", with the Pareto front of {len(front)} points highlighted"
        + (f"; not labelled for lack of room: {', '.join(crowded)}" if crowded else "")
    )
    return svg(element_id, width, height, body, label)


def paired_view(points: Sequence[Mapping], shown: Sequence[int]) -> tuple[list[Mapping], dict | None]:
    """The points as the plot draws them, and each axis's unit (None: their own values). With paired
    changes on every repaired point: each objective's change against the unrepaired model (in percent
    where every change has a relative form, else absolute) and its paired 95% interval; the unrepaired
    model at 0, without an interval (it is the reference)."""
    def change(p, key):
        c = (p.get("changes") or {}).get(key)
        return c if isinstance(c, Mapping) and c.get("delta_ci") else None

    repaired = [points[i] for i in shown if points[i]["kind"] != "base"]
    if not repaired or any(change(p, k) is None for p in repaired for k in ("fairness", "utility")):
        return list(points), None
    relative = {k: all(change(p, k).get("relative_defined", True) for p in repaired) for k in ("fairness", "utility")}
    view = []
    for p in points:
        q = dict(p)
        for key in ("fairness", "utility"):
            c = change(p, key) if p["kind"] != "base" else None
            if c is None:
                q[key], q[f"{key}_ci"] = 0.0, None
            elif relative[key]:
                q[key], q[f"{key}_ci"] = 100 * c["relative"], [100 * v for v in c["relative_ci"]]
            else:
                q[key], q[f"{key}_ci"] = c["delta"], list(c["delta_ci"])
        view.append(q)
    return view, {k: " (%)" if relative[k] else " (absolute)" for k in relative}


LABEL_FONT = 11
CHAR_WIDTH = 6.6  # a generous average advance of the report's sans-serif at 11 px, so estimated boxes hold the text
# where a label may go, nearest first: beside the point (right or left), then above and below, further out
LABEL_OFFSETS = [(9, 0), (9, -13), (9, 13), (0, -20), (0, 20), (16, -26), (16, 26), (24, -40), (24, 40), (36, -54),
                 (36, 54), (48, -70), (48, 70), (64, -90), (64, 90), (80, 0), (120, 0), (80, -110), (80, 110)]


def point_labels(view, shown, x, y, area) -> tuple[list[str], list[str]]:
    """A text label beside every point, placed greedily (the chosen checkpoint first, then the base
    model, each method's best, the rest) where its box meets no other label and no marker and stays
    in the plot area; a label set apart from its point gets a thin leader line. Returns the SVG and
    the names no place was found for (the caption lists them)."""
    left, top, right, bottom = area
    rank = {"chosen": 0, "base": 1, "best": 2}
    marks = {i: (x(view[i]["fairness"]), y(view[i]["utility"])) for i in shown}
    radius = {i: {"chosen": 15, "base": 10, "best": 10}.get(view[i]["kind"], 6) for i in shown}
    taken = [(px - radius[i], py - radius[i], px + radius[i], py + radius[i]) for i, (px, py) in marks.items()]
    out, crowded = ['<g class="labels">'], []
    for i in sorted(shown, key=lambda i: (rank.get(view[i]["kind"], 3), i)):
        p, (px, py) = view[i], marks[i]
        text = {"chosen": f"chosen: {p['name']}", "base": p["name"] if "unrepaired" in p["name"] else f"base model: {p['name']}"
                }.get(p["kind"], p["name"])
        w, r = CHAR_WIDTH * len(text) + 4, radius[i]
        spot = None
        for dx, dy in LABEL_OFFSETS:
            for anchor in ("start", "end"):
                gap = max(dx, r + 3) if dy == 0 else dx
                x0 = px + gap if anchor == "start" else px - gap - w
                if dx == 0:  # centred above or below
                    x0, anchor = px - w / 2, "middle"
                base_y = py + dy + (4 if dy == 0 else (0 if dy < 0 else 8)) + (-r if dy < 0 else r if dy > 0 else 0)
                box = (x0, base_y - LABEL_FONT, x0 + w, base_y + 3)
                if box[0] < left + 2 or box[2] > right - 2 or box[1] < top + 2 or box[3] > bottom - 2:
                    continue
                if any(_overlap(box, t) for t in taken):
                    continue
                spot = (box, anchor, base_y, dx, dy)
                break
            if spot:
                break
        if spot is None:
            crowded.append(p["name"])
            continue
        box, anchor, base_y, dx, dy = spot
        taken.append(box)
        tx = box[0] if anchor == "start" else box[2] if anchor == "end" else (box[0] + box[2]) / 2
        if abs(dy) > 13 or dx > 16:  # set apart: a leader from the point to the label's near edge
            ex = min(max(px, box[0]), box[2])
            ey = box[3] - 2 if dy < 0 else box[1] + 2
            out.append(f'<path class="leader" d="M{num(px)},{num(py)}L{num(ex)},{num(ey)}" stroke="{MUTED}" '
                       'stroke-width="0.8" fill="none"/>')
        colour = CHOSEN_COLOUR if p["kind"] == "chosen" else INK
        weight = ' font-weight="600"' if p["kind"] in ("chosen", "base") else ""
        out.append(f'<text class="point-label" x="{num(tx)}" y="{num(base_y)}" text-anchor="{anchor}" '
                   f'font-size="{LABEL_FONT}"{weight} fill="{colour}" stroke="#ffffff" stroke-width="3" '
                   f'paint-order="stroke">{esc(text)}</text>')
    out.append("</g>")
    return out, crowded


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _legend(points, shown, colours, on_front, x0: float, y0: float) -> list[str]:
    counts: dict[str, int] = {}
    for i in shown:
        counts[points[i]["method"]] = counts.get(points[i]["method"], 0) + 1
    out = [f'<g class="legend" font-size="12" fill="{INK}">']
    y = y0 + 12
    out.append(f'<text x="{num(x0)}" y="{num(y)}" font-weight="600">Method</text>')
    for method, colour in colours.items():
        y += 22
        out.append(f'<path d="{disc_path(x0 + 7, y - 4, 5)}" fill="{colour}"/>')
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">{esc(method)} ({counts[method]})</text>')
    y += 32
    out.append(f'<text x="{num(x0)}" y="{num(y)}" font-weight="600">Marks</text>')
    y += 22
    out.append(
        f'<path d="M{num(x0 - 2)},{num(y - 4)}h18" stroke="{FRONT_COLOUR}" stroke-width="1.75"/>'
        f'<path d="{disc_path(x0 + 7, y - 4, 5)}" fill="#ffffff" stroke="{FRONT_COLOUR}" stroke-width="1.6"/>'
    )
    out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">Pareto front ({len(on_front)})</text>')
    if any(points[i]["kind"] == "base" for i in shown):
        y += 22
        out.append(f'<path d="{square_path(x0 + 7, y - 4, 7)}" fill="none" stroke="{BASE_COLOUR}" stroke-width="2"/>')
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">base model (unrepaired)</text>')
    if any(points[i]["kind"] == "chosen" for i in shown):
        y += 22
        out.append(
            f'<path d="{star_path(x0 + 7, y - 4, 9)}" fill="none" stroke="{CHOSEN_COLOUR}" stroke-width="1.75" '
            f'stroke-linejoin="round"/>'
        )
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">chosen checkpoint</text>')
    if any(points[i]["kind"] == "best" for i in shown):
        y += 22
        out.append(f'<path d="{disc_path(x0 + 7, y - 4, 7)}" fill="none" stroke="{MUTED}" stroke-width="2"/>')
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">best of its method</text>')
    if any(points[i]["split"] == "search" for i in shown) and any(points[i]["split"] == "report" for i in shown):
        y += 22
        out.append(f'<path d="{disc_path(x0 + 7, y - 4, 4)}" fill="#ffffff" stroke="{MUTED}" stroke-width="1.4"/>')
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">hollow: search split</text>')
    if any(points[i]["fairness_ci"] or points[i]["utility_ci"] for i in shown):
        y += 22
        out.append(
            f'<path d="M{num(x0)},{num(y - 4)}h14M{num(x0)},{num(y - 7)}v6M{num(x0 + 14)},{num(y - 7)}v6" '
            f'stroke="{MUTED}" fill="none"/>'
        )
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y)}">confidence interval</text>')
    out.append("</g>")
    return out


SCORE_LABELS = {"r2": "R²", "spearman": "Spearman ρ", "mae": "MAE", "rmse": "RMSE", "pearson": "Pearson r"}


def fit_figure(fit: Mapping, spec: Mapping, *, element_id: str, colour: str) -> str:
    """Predicted (y) against measured (x) for one surrogate, with the y = x line and the scores."""
    width, height = 470, 400
    left, right, top, bottom = 86, 452, 16, 346
    pairs = [
        (float(m), float(p))
        for m, p in zip(fit["measured"], fit["predicted"])
        if math.isfinite(float(m)) and math.isfinite(float(p))
    ]
    lo, hi = domain([v for pair in pairs for v in pair])
    x = Axis(lo, hi, left, right)
    y = Axis(lo, hi, bottom, top)
    name = spec["name"]
    body = frame(x, y, f"measured {name}", f"predicted {name}", x_ticks=7, y_ticks=7)
    body.append(
        f'<line class="identity" x1="{num(x(lo))}" y1="{num(y(lo))}" x2="{num(x(hi))}" y2="{num(y(hi))}" '
        f'stroke="{MUTED}" stroke-width="1.25" stroke-dasharray="5 4"/>'
    )
    body.append('<g class="points">')
    for m, p in pairs:
        body.append(
            f'<circle cx="{num(x(m))}" cy="{num(y(p))}" r="3.5" fill="{colour}" fill-opacity="0.7" '
            f'stroke="#ffffff" stroke-width="0.6"><title>measured {esc(fmt(m))}, predicted {esc(fmt(p))}</title></circle>'
        )
    body.append("</g>")
    if not pairs:
        body.append(
            f'<text x="{num((left + right) / 2)}" y="{num((top + bottom) / 2)}" text-anchor="middle" '
            f'fill="{MUTED}">no finite (measured, predicted) pairs</text>'
        )
    lines = [f"n = {len(pairs)}"] + [
        f"{SCORE_LABELS.get(k, k)} = {fmt(float(v), 3) if isinstance(v, Real) else fmt(None, 3) if v is None else v}"
        for k, v in score_items(fit)
    ]
    box_h = 8 + 17 * (len(lines) + 1)
    box_w = 14 + 7.2 * max(len(s) for s in lines)
    body.append(
        f'<rect x="{num(left + 8)}" y="{num(top + 8)}" width="{num(box_w)}" height="{num(box_h)}" rx="4" '
        f'fill="#ffffff" fill-opacity="0.92" stroke="#d0d7de"/>'
    )
    for k, text in enumerate(lines):
        body.append(
            f'<text class="score" x="{num(left + 15)}" y="{num(top + 25 + 17 * k)}" font-size="12" '
            f'fill="{INK}">{esc(text)}</text>'
        )
    key_y = top + 25 + 17 * len(lines)
    body.append(
        f'<path d="M{num(left + 15)},{num(key_y - 4)}h22" stroke="{MUTED}" stroke-width="1.25" stroke-dasharray="5 4"/>'
        f'<text x="{num(left + 43)}" y="{num(key_y)}" font-size="12" fill="{MUTED}">y = x</text>'
    )
    return svg(element_id, width, height, body, f"Surrogate fit for {name}: predicted against measured")


def score_items(fit: Mapping) -> list[tuple[str, object]]:
    """The fit's scores, the usual ones first."""
    scores = fit.get("scores") or {}
    known = [k for k in ("r2", "spearman", "mae", "rmse", "pearson") if k in scores]
    return [(k, scores[k]) for k in known + [k for k in scores if k not in known]]
