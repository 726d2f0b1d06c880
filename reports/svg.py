"""SVG building blocks: escaping, number formatting, linear axes with nice ticks, marker shapes.

Everything here returns strings meant to sit inline in an HTML page (no xmlns needed there), so a
figure needs no plotting library, no JavaScript and no external resource.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Iterable, Sequence

FONT = 12
GRID = "#e3e6ea"
INK = "#1f2328"
MUTED = "#57606a"


def esc(value) -> str:
    """Text escaped for HTML element content and attribute values alike."""
    return escape(str(value), quote=True)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number for people: `digits` significant digits, "n/a" for missing or non-finite."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    text = f"{value:.{digits}g}"
    return text.replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def num(value: float) -> str:
    """A coordinate for an SVG attribute: two decimals, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def domain(values: Iterable[float], pad: float = 0.06) -> tuple[float, float]:
    """(lo, hi) covering every finite value with `pad` of the span added on each side."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    span = hi - lo
    if span <= 0 or span < 1e-12 * max(abs(lo), abs(hi)):
        half = abs(lo) * 0.05 or 0.5
        return lo - half, hi + half
    return lo - pad * span, hi + pad * span


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick positions (1, 2, 2.5 or 5 times a power of ten) inside [lo, hi]."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    raw = span / max(target - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels with one shared number of decimals, enough to tell neighbouring ticks apart."""
    if len(ticks) < 2:
        return [fmt(t) for t in ticks]
    step = abs(ticks[1] - ticks[0])
    biggest = max(abs(t) for t in ticks)
    if biggest >= 1e6 or (biggest > 0 and biggest < 1e-3):
        return [f"{t:.2e}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if any(abs(round(t, decimals) - t) > step * 1e-6 for t in ticks):
        decimals += 1
    return [f"{t:.{decimals}f}" for t in ticks]


@dataclass(frozen=True)
class Axis:
    """Maps data values in [lo, hi] linearly onto pixels [px0, px1] (px1 < px0 for a y axis)."""

    lo: float
    hi: float
    px0: float
    px1: float

    def __call__(self, value: float) -> float:
        return self.px0 + (value - self.lo) / (self.hi - self.lo) * (self.px1 - self.px0)

    def ticks(self, target: int = 6) -> list[float]:
        return nice_ticks(self.lo, self.hi, target)


def frame(x: Axis, y: Axis, x_label: str, y_label: str, *, x_ticks: int = 7, y_ticks: int = 6) -> list[str]:
    """Plot background, grid, ticks with labels and axis titles for the box spanned by `x` and `y`."""
    left, right = min(x.px0, x.px1), max(x.px0, x.px1)
    top, bottom = min(y.px0, y.px1), max(y.px0, y.px1)
    out = [
        f'<rect x="{num(left)}" y="{num(top)}" width="{num(right - left)}" height="{num(bottom - top)}" '
        f'fill="#fbfcfd" stroke="#c9ced4"/>'
    ]
    xt = x.ticks(x_ticks)
    for value, label in zip(xt, tick_labels(xt)):
        px = x(value)
        out.append(f'<line x1="{num(px)}" y1="{num(top)}" x2="{num(px)}" y2="{num(bottom)}" stroke="{GRID}"/>')
        out.append(f'<line x1="{num(px)}" y1="{num(bottom)}" x2="{num(px)}" y2="{num(bottom + 5)}" stroke="{MUTED}"/>')
        out.append(
            f'<text x="{num(px)}" y="{num(bottom + 18)}" text-anchor="middle" font-size="{FONT - 1}" '
            f'fill="{MUTED}">{esc(label)}</text>'
        )
    yt = y.ticks(y_ticks)
    for value, label in zip(yt, tick_labels(yt)):
        py = y(value)
        out.append(f'<line x1="{num(left)}" y1="{num(py)}" x2="{num(right)}" y2="{num(py)}" stroke="{GRID}"/>')
        out.append(f'<line x1="{num(left - 5)}" y1="{num(py)}" x2="{num(left)}" y2="{num(py)}" stroke="{MUTED}"/>')
        out.append(
            f'<text x="{num(left - 8)}" y="{num(py + 4)}" text-anchor="end" font-size="{FONT - 1}" '
            f'fill="{MUTED}">{esc(label)}</text>'
        )
    out.append(
        f'<text x="{num((left + right) / 2)}" y="{num(bottom + 42)}" text-anchor="middle" '
        f'font-size="{FONT + 1}" fill="{INK}">{esc(x_label)}</text>'
    )
    cy = (top + bottom) / 2
    out.append(
        f'<text x="{num(left - 62)}" y="{num(cy)}" text-anchor="middle" font-size="{FONT + 1}" fill="{INK}" '
        f'transform="rotate(-90 {num(left - 62)} {num(cy)})">{esc(y_label)}</text>'
    )
    return out


def disc_path(cx: float, cy: float, r: float) -> str:
    """A circle drawn as a path (legend swatches and rings, so only data points are <circle>s)."""
    return (
        f"M{num(cx - r)},{num(cy)}a{num(r)},{num(r)} 0 1,0 {num(2 * r)},0"
        f"a{num(r)},{num(r)} 0 1,0 {num(-2 * r)},0Z"
    )


def square_path(cx: float, cy: float, half: float) -> str:
    return (
        f"M{num(cx - half)},{num(cy - half)}h{num(2 * half)}v{num(2 * half)}h{num(-2 * half)}Z"
    )


def star_path(cx: float, cy: float, r: float) -> str:
    """A five-pointed star of outer radius r."""
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append(f"{num(cx + radius * math.cos(angle))},{num(cy + radius * math.sin(angle))}")
    return "M" + "L".join(points) + "Z"


def svg(element_id: str, width: int, height: int, body: Iterable[str], label: str) -> str:
    """An inline <svg> with a stable id, an accessible label and a viewBox so it scales down cleanly."""
    return (
        f'<svg id="{esc(element_id)}-svg" class="plot" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{esc(label)}" font-size="{FONT}">'
        + "".join(body)
        + "</svg>"
    )
