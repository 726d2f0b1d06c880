"""The FairMed probers' heat map: layer (x) by attribute (y), each cell the prober's held-out macro-F1
minus the majority baseline's, as inline SVG.

Colours diverge around 0 (blue: the prober beats always guessing the most common group, so the layer
carries that attribute's associations; red: it does worse), on a scale symmetric about 0 so that
equal colours mean equal gains either way. Every cell is one <rect class="cell"> with its numbers in
a <title> tooltip, so a browser shows them on hover and a test can count and read them.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from reports.svg import FONT, INK, MUTED, esc, fmt, num, svg

NEGATIVE, MIDDLE, POSITIVE = (178, 24, 43), (247, 247, 247), (33, 102, 172)  # ColorBrewer RdBu ends
MISSING = "#d0d7de"
REQUIRED = ("layer", "attribute", "macro_f1", "majority_f1")


def check_probes(probes: Sequence[Mapping]) -> list[dict]:
    """The probe score records, checked: a ValueError names the first malformed one."""
    out = []
    for i, s in enumerate(probes):
        if not isinstance(s, Mapping):
            raise ValueError(f"probe score {i} is not a mapping")
        missing = [k for k in REQUIRED if k not in s]
        if missing:
            raise ValueError(f"probe score {i} lacks {', '.join(missing)}")
        if isinstance(s["layer"], bool) or not isinstance(s["layer"], int):
            raise ValueError(f"probe score {i}: layer must be an integer, got {s['layer']!r}")
        for k in ("macro_f1", "majority_f1"):
            if isinstance(s[k], bool) or not isinstance(s[k], (int, float)):
                raise ValueError(f"probe score {i}: {k} must be a number, got {s[k]!r}")
        out.append(dict(s))
    return out


def gain(s: Mapping) -> float:
    """The cell's value: macro-F1 minus the majority baseline's macro-F1."""
    return float(s["macro_f1"]) - float(s["majority_f1"])


def colour(value: float, scale: float) -> str:
    """Diverging colour for `value` in [-scale, scale] (clipped); grey when not finite."""
    if not math.isfinite(value):
        return MISSING
    t = max(-1.0, min(1.0, value / scale))
    end = POSITIVE if t > 0 else NEGATIVE
    rgb = (round(m + abs(t) * (e - m)) for m, e in zip(MIDDLE, end))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _scale(values) -> float:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return max(finite + [0.05])  # a floor, so near-zero noise is not painted at full strength


def _tooltip(s: Mapping) -> str:
    lines = [f"layer {s['layer']}, {s['attribute']}: macro-F1 - majority-F1 = {gain(s):+.3f}",
             f"macro-F1 {fmt(float(s['macro_f1']), 3)}, majority baseline {fmt(float(s['majority_f1']), 3)}"]
    if "accuracy" in s and "majority" in s:
        lines.append(f"accuracy {fmt(float(s['accuracy']), 3)}, majority label {fmt(float(s['majority']), 3)}")
    if "vector_norm_ratio" in s:
        lines.append(f"|mean(unbiased) - mean(biased)| / mean |x| = {fmt(float(s['vector_norm_ratio']), 3)}")
    if "kl" in s and "kl_mean" in s:
        lines.append(f"KL {fmt(float(s['kl']), 3)} (training mean {fmt(float(s['kl_mean']), 3)})")
    if "n_concepts" in s:
        lines.append(f"{s.get('n_prompts', '?')} prompts, {s['n_concepts']} concepts")
    return "\n".join(lines)


def probe_heatmap(probes: Sequence[Mapping], *, element_id: str = "fig-probes") -> str:
    """Layer x attribute heat map of macro_f1 - majority_f1, with labelled axes and a colour legend."""
    probes = check_probes(probes)
    layers = sorted({s["layer"] for s in probes})
    attributes = list(dict.fromkeys(s["attribute"] for s in probes))
    cell = {(s["layer"], s["attribute"]): s for s in probes}
    label_w = 16 + 7 * max([len(str(a)) for a in attributes] + [4])
    left, top = 40 + label_w, 16
    cw = max(12.0, min(40.0, 760.0 / max(len(layers), 1)))
    ch = 26.0
    right, bottom = left + cw * len(layers), top + ch * len(attributes)
    scale = _scale([gain(s) for s in probes])
    where = "residual stream" if probes[0].get("kind") == "fairsteer" else "MLP output"

    body = [f'<text x="{num(left - label_w - 24)}" y="{num((top + bottom) / 2)}" text-anchor="middle" '
            f'font-size="{FONT + 1}" fill="{INK}" transform="rotate(-90 {num(left - label_w - 24)} '
            f'{num((top + bottom) / 2)})">attribute</text>']
    for j, a in enumerate(attributes):
        body.append(f'<text x="{num(left - 6)}" y="{num(top + ch * j + ch / 2 + 4)}" text-anchor="end" '
                    f'font-size="{FONT - 1}" fill="{MUTED}">{esc(a)}</text>')
    every = max(1, math.ceil(18 / cw))  # a layer label every `every` columns, so labels never overlap
    for i, layer in enumerate(layers):
        if i % every == 0:
            body.append(f'<text x="{num(left + cw * i + cw / 2)}" y="{num(bottom + 16)}" text-anchor="middle" '
                        f'font-size="{FONT - 1}" fill="{MUTED}">{layer}</text>')
    body.append(f'<text x="{num((left + right) / 2)}" y="{num(bottom + 38)}" text-anchor="middle" '
                f'font-size="{FONT + 1}" fill="{INK}">layer ({where} at the last prompt token)</text>')
    body.append('<g class="cells" stroke="#ffffff" stroke-width="1">')
    for j, a in enumerate(attributes):
        for i, layer in enumerate(layers):
            s = cell.get((layer, a))
            fill = colour(gain(s), scale) if s is not None else MISSING
            title = f"<title>{esc(_tooltip(s))}</title>" if s is not None else ""
            cls = "cell" if s is not None else "cell-missing"
            body.append(f'<rect class="{cls}" data-layer="{layer}" data-attribute="{esc(a)}" '
                        f'x="{num(left + cw * i)}" y="{num(top + ch * j)}" width="{num(cw)}" height="{num(ch)}" '
                        f'fill="{fill}">{title}</rect>')
    body.append("</g>")
    body.extend(_legend(right + 28, top, max(bottom - top, 120.0), scale))
    width = int(right + 28 + 150)
    height = int(max(bottom, top + 120) + 52)
    label = (f"Heat map of the probers' held-out macro-F1 minus the majority baseline's, {len(layers)} layers by "
             f"{len(attributes)} attributes")
    return svg(element_id, width, height, body, label)


def _legend(x0: float, top: float, height: float, scale: float) -> list[str]:
    """A vertical colour bar from +scale (top) to -scale (bottom), with its ends and 0 labelled."""
    steps = 24
    out = ['<g class="legend">',
           f'<text x="{num(x0)}" y="{num(top + 8)}" font-size="{FONT - 1}" font-weight="600" fill="{INK}">F1 gain</text>']
    bar_top, bar_h = top + 18, height - 18
    for k in range(steps):
        value = scale * (1 - 2 * (k + 0.5) / steps)
        out.append(f'<rect x="{num(x0)}" y="{num(bar_top + bar_h * k / steps)}" width="14" '
                   f'height="{num(bar_h / steps + 0.5)}" fill="{colour(value, scale)}"/>')
    out.append(f'<rect x="{num(x0)}" y="{num(bar_top)}" width="14" height="{num(bar_h)}" fill="none" stroke="#c9ced4"/>')
    for value, y, words in ((scale, bar_top, "beats majority"), (0.0, bar_top + bar_h / 2, "= majority"),
                            (-scale, bar_top + bar_h, "below majority")):
        out.append(f'<text x="{num(x0 + 20)}" y="{num(y + 4)}" font-size="{FONT - 1}" fill="{MUTED}">'
                   f'{esc(f"{value:+.2f}" if value else "0")} {esc(words)}</text>')
    out.append("</g>")
    return out


def standalone(inline_svg: str) -> str:
    """An inline SVG as a file of its own (the namespace a bare .svg needs, and a font)."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            + inline_svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" '
                                 'font-family="system-ui, sans-serif" ', 1) + "\n")
