"""The report: one self-contained HTML page plus the Pareto front as CSV and JSON.

The page has inline CSS and inline SVG only: no JavaScript, no fonts, images or style sheets from
anywhere, so it opens the same from file:// with no network. A Content-Security-Policy meta tag
enforces that. Every piece of text from the records is escaped.

Figure ids (for browser tests and screenshots): "fig-front" (trade-off plot), "fig-fit-fairness" and
"fig-fit-utility" (a second fit for the same objective gets "-2", and so on), "fig-probes" (the FairMed
probers' heat map, when probe scores are given); the front table is "table-front", the summary
"summary", the run details "meta".
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

from reports.atomic import publish_dir
from reports.figures import direction_words, fit_figure, front_figure, method_colours, paired_view
from reports.heatmap import check_probes, probe_heatmap
from reports.records import (
    describe_config,
    OBJECTIVES,
    check_fits,
    check_objectives,
    check_points,
    choose_front,
    csv_text,
    json_text,
    n_pruned,
    plottable,
)
from reports.svg import esc, fmt

DEFAULT_TITLE = "Fairness repair report"
FIT_COLOURS = {"fairness": "#0072B2", "utility": "#D55E00"}

CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #57606a; --line: #d0d7de; --soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: #ffffff; color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
header p { margin: 0; color: var(--muted); }
h2 { font-size: 18px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
figure { margin: 0; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; max-width: 860px; }
svg.plot { display: block; max-width: 100%; height: auto; font-family: inherit; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 12px; margin-top: 20px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: var(--soft); }
.card h3 { margin: 0 0 6px; font-size: 12px; text-transform: uppercase; letter-spacing: 0.05em; color: var(--muted); }
.card .name { font-weight: 600; overflow-wrap: anywhere; }
.card .metric { margin-top: 8px; }
.card .label { color: var(--muted); font-size: 12px; }
.card .value { font-size: 16px; font-variant-numeric: tabular-nums; }
.card .value .ci { color: var(--muted); font-size: 12px; }
.card .delta { font-size: 12px; font-variant-numeric: tabular-nums; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; margin: 6px 0 0; }
.card dt { color: var(--muted); }
.card dd { margin: 0; font-variant-numeric: tabular-nums; }
.better { color: #1a7f37; }
.sig { font-weight: 600; }
.ns { color: var(--muted); }
.worse { color: #cf222e; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; background: var(--soft); }
td.num, th.num { text-align: right; }
td .ci { color: var(--muted); font-size: 12px; }
td.name { overflow-wrap: anywhere; max-width: 320px; }
tr.chosen td { background: #fff5f5; }
tr.base td { background: #f3f4f6; }
tr.excluded td { color: #57606a; }
.tag { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 12px; border: 1px solid var(--line); }
.tag.chosen { border-color: #c9302c; color: #c9302c; }
.tag.base { border-color: #57606a; color: #57606a; }
.tag.best { border-color: #1f2328; color: #1f2328; }
.swatch { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 6px; }
.fits { display: flex; flex-wrap: wrap; gap: 20px 28px; }
.fits figure { flex: 0 1 470px; }
.fits h3 { font-size: 14px; margin: 0 0 4px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
  background: var(--soft); padding: 1px 4px; border-radius: 4px; }
.note { color: var(--muted); font-size: 13px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
.scroll { overflow-x: auto; }
#headline { margin-top: 16px; padding: 14px 16px; border-left: 4px solid #c9302c; background: var(--soft); border-radius: 4px; }
#headline p { margin: 0 0 6px; }
#headline .verdict { font-size: 17px; }
#headline ul { margin: 0; padding-left: 18px; }
#headline li { margin: 2px 0; }
@media (max-width: 600px) { main { padding: 16px 12px 32px; } header h1 { font-size: 21px; } }
"""


def build_report(
    points: Sequence[Mapping],
    *,
    objectives: Mapping,
    fits: Sequence[Mapping] = (),
    title: str = "",
    meta: Mapping | None = None,
    probes: Sequence[Mapping] | None = None,
    select_points: Sequence[Mapping] | None = None,
    costs: Mapping | None = None,
    bests: Sequence[Mapping] | None = None,
    excluded: Sequence[Mapping] | None = None,
) -> dict[str, str]:
    """The report's files as {"index.html": ..., "pareto.csv": ..., "pareto.json": ...}. `probes`: the
    FairMed probers' held-out scores, one record per layer and attribute (`repair probe` writes them),
    or FairSteer's probe scores (one per layer, `kind` "fairsteer"). A run of several methods adds
    `select_points` (every verified configuration on the select split, what the choice saw) and
    `costs` (repair.costs: each method's evaluations, time, generation slowdown, extra parameters) and
    `bests` (each method's best and each stack with their changes, already formatted). `excluded`: the
    finalists the guards refused on the select split, each with its configuration and failed guards."""
    objectives = check_objectives(objectives)
    pts = check_points(points)
    fit_records = check_fits(fits)
    probe_records = check_probes(probes) if probes else []
    meta = dict(meta or {})
    title = str(title or DEFAULT_TITLE)
    front = choose_front(pts, objectives)
    select = check_points(select_points) if select_points else []
    extra = [_excluded(excluded), _bests(bests), _select_view(select, objectives), _costs(costs)]
    return {
        "index.html": render_html(pts, front, objectives, fit_records, title=title, meta=meta, probes=probe_records,
                                  extra=extra, costs=costs),
        "pareto.csv": csv_text([pts[i] for i in front]),
        "pareto.json": json_text(objectives, pts, front, title=title, meta=meta),
    }


def write_report(
    out_dir: Path,
    points: Sequence[Mapping],
    *,
    objectives: Mapping,
    fits: Sequence[Mapping] = (),
    title: str = "",
    meta: Mapping | None = None,
    probes: Sequence[Mapping] | None = None,
    select_points: Sequence[Mapping] | None = None,
    costs: Mapping | None = None,
    bests: Sequence[Mapping] | None = None,
    excluded: Sequence[Mapping] | None = None,
) -> Path:
    """Write out_dir/index.html, pareto.csv and pareto.json all at once; return the index.html path.

    Everything is rendered in memory first, then written into a temporary directory beside `out_dir`
    and moved into place, so an existing report is only replaced by a complete new one (see
    reports.atomic.publish_dir). Raises ValueError, naming the record, on malformed input.
    """
    files = build_report(points, objectives=objectives, fits=fits, title=title, meta=meta, probes=probes,
                         select_points=select_points, costs=costs, bests=bests, excluded=excluded)
    return publish_dir(Path(out_dir), files) / "index.html"


# ---------------------------------------------------------------------------------------------- page


def render_html(
    points: Sequence[Mapping],
    front: Sequence[int],
    objectives: Mapping,
    fits: Sequence[Mapping],
    *,
    title: str,
    meta: Mapping,
    probes: Sequence[Mapping] = (),
    extra: Sequence[str] = (),
    costs: Mapping | None = None,
) -> str:
    """The page for already checked records (see build_report); `extra`: sections after the front table."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body><main>",
        _header(points, front, title, meta),
        _headline(points, objectives, costs),
        _tradeoff(points, front, objectives),
        _summary(points, front, objectives),
        _front_table(points, front, objectives),
        *extra,
        _fits(fits, objectives),
        _probes(probes),
        _meta(meta),
        '<footer>Generated by fairness-repair. Data: <a href="pareto.csv">pareto.csv</a> (the front), '
        '<a href="pareto.json">pareto.json</a> (all points).'
        + (f' Generations of the unrepaired and the repaired model side by side: <a href="{esc(meta["compare"])}">'
           'compare.html</a> (<code>repair compare</code>).' if meta.get("compare") else "") + '</footer>',
        "</main></body></html>",
    ]
    page = "\n".join(p for p in parts if p) + "\n"
    return re.sub(r"(<table\b.*?</table>)", r'<div class="scroll">\1</div>', page, flags=re.S)  # wide tables scroll on a phone


def _select_view(points, objectives) -> str:
    """Every verified configuration as the choice saw it: the select split's numbers."""
    if not points:
        return ""
    front = choose_front(points, objectives)
    caption = ("Every configuration verified on the held-out select split, the numbers the choice was made on "
               "(the report split above is what it is judged on). The line joins the select split's front.")
    return ('<section id="select"><h2>Select split: every verified configuration</h2>'
            f'<figure id="fig-select">{front_figure(points, front, objectives, element_id="fig-select-svg")}'
            f"<figcaption>{esc(caption)}</figcaption></figure></section>")


def _excluded(rows) -> str:
    """The finalists the guards refused on the select split, and why: a repair that games kl_neutral (by
    raising kl_uniform or moving the neutral reference) is listed here, not chosen."""
    if rows is None:
        return ""
    if not rows:
        return ('<section id="excluded"><h2>Excluded by the guards (select split)</h2><p class="note">Every verified '
                'finalist passed the guards: utility within its bound, kl_uniform not rising, the neutral reference in '
                'place.</p></section>')
    body = "".join(f'<tr><td>{esc(r["config"])}</td><td>{esc("; ".join(r["failed"]))}</td></tr>' for r in rows)
    return ('<section id="excluded"><h2>Excluded by the guards (select split)</h2><table><thead><tr><th>Configuration'
            f'</th><th>Failed guards</th></tr></thead><tbody>{body}</tbody></table><p class="note">A finalist is chosen '
            'only if, on the select split, its utility stays within the bound, the upper end of kl_uniform\'s paired '
            'interval does not rise past the allowance and the neutral reference q moves no further than the '
            'unrepaired model\'s own spread: kl_neutral can be won by sending every prompt to one distribution, '
            'which these guards refuse.</p></section>')


def _bests(rows) -> str:
    """Each method's best and each stack on the report split: the changes that matter side by side."""
    if not rows:
        return ""
    colours = method_colours(rows)
    columns = ("fairness", "utility", "kl_neutral", "kl_uniform", "stereotype_preferred", "mean_gap")
    body = "".join(
        f'<tr><td><span class="swatch" style="background:{colours[r["method"]]}"></span>{esc(r["method"])}</td>'
        f'<td>{esc(r["config"])}</td>' + "".join(f'<td class="num">{esc(r.get(c, "n/a"))}</td>' for c in columns)
        + f'<td>{esc(r.get("against_parts", ""))}</td></tr>' for r in rows)
    return ('<section id="bests"><h2>Each method\'s best and the stacks (report split)</h2><table><thead><tr>'
            '<th>Method</th><th>Configuration</th>' + "".join(f'<th class="num">{esc(c)}</th>' for c in columns)
            + '<th>Stack against its parts</th></tr></thead>'
            f'<tbody>{body}</tbody></table><p class="note">Changes against the unrepaired model on the report split, '
            'with paired 95% bootstrap intervals (* excludes 0). Each best was chosen on the select split; a stack '
            'applies two of them together and is fairer than its parts only where its fairness is below both.</p></section>')


def _costs(costs) -> str:
    """Each method's cost beside its best configuration's fairness: evaluations, time, generation
    slowdown against the unrepaired model, extra parameters and memory."""
    if not costs:
        return ""
    colours = method_colours([{"method": r["method"]} for r in costs["rows"]])
    gen = costs["generation"]
    rows = []
    for r in costs["rows"]:
        slowdown = f'{r["generation_slowdown"]:.2f}x' if "generation_slowdown" in r else "n/a"
        params = f'{r["extra_parameters"]:,}' if "extra_parameters" in r else "n/a"
        memory = f'{r["extra_bytes"] / 2**20:.1f} MiB' if "extra_bytes" in r else "n/a"
        described = describe_config(r) if r.get("config") else "none within the utility limit"
        rows.append(
            f'<tr><td><span class="swatch" style="background:{colours[r["method"]]}"></span>{esc(r["method"])}</td>'
            f'<td class="num">{r["evaluations"]}</td><td class="num">{r["held_out_evaluations"]}</td>'
            f'<td class="num">{r["seconds"] / 60:.1f} min</td><td class="num">{esc(slowdown)}</td>'
            f'<td class="num">{esc(params)}</td><td class="num">{esc(memory)}</td><td>{esc(described)}</td></tr>')
    note = (f"LLM evaluations on the search split (fitting included in the time), and of the method's configurations "
            f"on the held-out splits, which all methods share ({costs['held_out_seconds'] / 60:.1f} min in all). "
            f"Generation slowdown: the best configuration against the unrepaired model, greedy, {gen['new_tokens']} "
            f"tokens after each of {gen['prompts']} prompts, best of {gen['repeats']}, on the machine of the run "
            f"({costs['base_generation_seconds']:.2f} s unrepaired). Extra parameters: what the repaired checkpoint "
            f"holds or runs beyond the base model's {costs['base_parameters']:,} (pruning zeroes weights: none).")
    return ('<section id="costs"><h2>What each method costs</h2><table><thead><tr><th>Method</th>'
            '<th class="num">Search evaluations</th><th class="num">Held-out evaluations</th><th class="num">Wall time</th>'
            '<th class="num">Generation slowdown</th><th class="num">Extra parameters</th><th class="num">Extra memory</th>'
            f'<th>Best configuration</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="note">{esc(note)}</p></section>')


def _header(points, front, title, meta) -> str:
    bits = []
    if meta.get("model"):
        bits.append(f"model {meta['model']}")
    bits.append(f"{len(points)} configurations, {len(front)} on the Pareto front")
    if meta.get("date"):
        bits.append(str(meta["date"]))
    return f"<header><h1>{esc(title)}</h1><p>{esc(' · '.join(bits))}</p></header>"


def _value_ci(value: float, ci) -> str:
    text = esc(fmt(value))
    if ci is not None:
        text += f' <span class="ci">[{esc(fmt(ci[0]))}, {esc(fmt(ci[1]))}]</span>'
    return text


def _paired(change) -> str:
    """A change's paired 95% interval and whether it excludes zero, or nothing when there is none."""
    if not isinstance(change, Mapping) or not change.get("relative_ci"):
        return ""
    relative = change.get("relative_defined", True)  # else a signed metric near 0: the absolute change
    lo, hi = change["relative_ci"] if relative else change["delta_ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    mark = ('<span class="sig" title="the paired 95% interval excludes zero">significant</span>' if change.get("significant")
            else '<span class="ns" title="the paired 95% interval includes zero">within noise</span>')
    shown = (f"{lo:+.1%}", f"{hi:+.1%}") if relative else (f"{lo:+.4g}", f"{hi:+.4g}")
    return f' <span class="ci">paired 95% CI [{esc(shown[0])}, {esc(shown[1])}]{"" if relative else " (absolute)"}</span> {mark}'


def _change(chosen: float, base: float, better: str, change=None) -> str:
    """The chosen point's change against the base, coloured by whether it is an improvement, with the
    paired interval of the change when the records carry one."""
    delta = chosen - base
    if not (math.isfinite(delta)):
        return ""
    rel = f" ({delta / abs(base):+.1%})" if base != 0 else ""
    if better in ("closer-to-zero", "closer-to-half"):
        ideal = 0.5 if better == "closer-to-half" else 0.0
        improved, worsened = abs(chosen - ideal) < abs(base - ideal), abs(chosen - ideal) > abs(base - ideal)
    else:
        improved = delta < 0 if better == "lower" else delta > 0
        worsened = delta > 0 if better == "lower" else delta < 0
    cls, word = ("better", "better") if improved else ("worse", "worse") if worsened else ("", "unchanged")
    return f'<span class="{cls}">{esc(f"{delta:+.4g}{rel}")} vs base · {word}</span>{_paired(change)}'


def _summary(points, front, objectives) -> str:
    base = next((p for p in points if p["kind"] == "base"), None)
    chosen = next((p for p in points if p["kind"] == "chosen"), None)
    cards = []
    for label, p in (("Base model (unrepaired)", base), ("Chosen checkpoint", chosen)):
        if p is None:
            continue
        rows = []
        for key in OBJECTIVES:
            change = ""
            if p is chosen and base is not None:
                paired = (p.get("changes") or {}).get(key)
                change = f'<div class="delta">{_change(p[key], base[key], objectives[key]["better"], paired)}</div>'
            rows.append(
                f'<div class="metric"><div class="label">{esc(objectives[key]["name"])}</div>'
                f'<div class="value">{_value_ci(p[key], p[f"{key}_ci"])}</div>{change}</div>'
            )
        for key, shown in (p.get("shown") or {}).items():  # kl_neutral and kl_uniform always, pairs where measured
            paired = ((p.get("changes") or {}).get("metrics") or {}).get(key)
            before = (base.get("shown") or {}).get(key) if base is not None else None
            change = f'<div class="delta">{_change(shown["value"], before["value"], shown["better"], paired)}</div>' \
                if p is chosen and before is not None else ""
            rows.append(f'<div class="metric"><div class="label">{esc(key.split("/")[-1])} ({esc(key.split("/")[0])})</div>'
                        f'<div class="value">{esc(fmt(shown["value"]))}</div>{change}</div>')
        count = n_pruned(p)
        if count is not None:
            rows.append(f'<div class="metric"><div class="label">pruned heads</div><div class="value">{count}</div></div>')
        elif describe_config(p):
            rows.append(f'<div class="metric"><div class="label">configuration</div><div class="value">'
                        f'{esc(describe_config(p))}</div></div>')
        cards.append(
            f'<div class="card"><h3>{esc(label)}</h3><div class="name">{esc(p["name"])}</div>{"".join(rows)}</div>'
        )
    colours = method_colours(points)
    counts: dict[str, int] = {}
    for p in points:
        counts[p["method"]] = counts.get(p["method"], 0) + 1
    methods = "".join(
        f'<dt><span class="swatch" style="background:{colours[m]}"></span>{esc(m)}</dt><dd>{n}</dd>'
        for m, n in counts.items()
    )
    cards.append(
        f'<div class="card"><h3>Configurations</h3><div class="name">{len(points)} measured, '
        f"{len(front)} on the front</div><dl>{methods}</dl></div>"
    )
    return f'<section id="summary" class="cards">{"".join(cards)}</section>'


def _headline(points, objectives, costs) -> str:
    """The first screen's answer: what the run chose, how much fairer it is and at what cost, in the
    paired changes against the unrepaired model on the report split (values where records carry none)."""
    base = next((p for p in points if p["kind"] == "base"), None)
    chosen = next((p for p in points if p["kind"] == "chosen"), None)
    if chosen is None:
        if base is None:
            return ""
        return ('<section id="headline"><p class="verdict"><b>Kept the unrepaired model</b>: no repaired configuration '
                'passed the guards (see the excluded configurations below).</p></section>')
    described = describe_config(chosen)
    facts = []
    for role, key in (("Fairness", "fairness"), ("Utility, the cost", "utility")):
        spec = objectives[key]
        change = (chosen.get("changes") or {}).get(key)
        if isinstance(change, Mapping) and change.get("relative_ci"):
            text = f'{esc(spec["name"])} <b>{esc(format(change["relative"], "+.1%"))}</b>{_paired(change)}'
        elif base is not None:
            text = f'{esc(spec["name"])} {esc(fmt(base[key]))} → <b>{esc(fmt(chosen[key]))}</b>'
        else:
            continue
        facts.append(f"<li>{role}: {text} ({esc(direction_words(spec['better']))})</li>")
    for key in chosen.get("shown") or {}:  # kl_uniform may not rise: the guard's evidence against gaming
        paired = ((chosen.get("changes") or {}).get("metrics") or {}).get(key)
        if key.endswith("kl_uniform") and isinstance(paired, Mapping) and paired.get("relative_ci"):
            facts.append(f"<li>Guard: kl_uniform {esc(format(paired['relative'], '+.1%'))}{_paired(paired)} "
                         "(it may not rise: a repair that sent every prompt to one distribution would raise it)</li>")
    row = next((r for r in (costs or {}).get("rows", []) if r.get("method") == chosen["method"]
                and r.get("config") == chosen.get("config")), None)
    if row is not None and "generation_slowdown" in row:
        facts.append(f"<li>Running it: generation {row['generation_slowdown']:.2f}x the unrepaired model's time"
                     + (f", {row['extra_bytes'] / 2**20:.1f} MiB extra" if row.get("extra_bytes") else "") + "</li>")
    where = "on the report split, whose wording no choice has seen" if chosen.get("split") == "report" else \
        f"on the {esc(chosen.get('split', ''))} split"
    return (f'<section id="headline"><p class="verdict">Chose <b>{esc(chosen["name"])}</b>'
            + (f' <span class="note">({esc(described)})</span>' if described and described != chosen["name"] else "")
            + f'</p><ul>{"".join(facts)}</ul><p class="note">Changes against the unrepaired model {where}, '
            'with paired 95% intervals.</p></section>')


def _better_corner(objectives) -> str:
    horizontal = {"lower": "left", "higher": "right"}.get(objectives["fairness"]["better"])
    vertical = {"lower": "bottom", "higher": "top"}.get(objectives["utility"]["better"])
    if horizontal and vertical:
        return f" Better is toward the {vertical} {horizontal}."
    return ""


def _tradeoff(points, front, objectives) -> str:
    usable = [p for p in points if plottable(p)]
    splits = {p["split"] for p in usable}
    if any("front" in p for p in points):
        how = "The front is the set flagged in the records."
    elif splits == {"report", "search"}:
        how = ("The front is computed among report-split points only (hollow points were measured on the "
               "search split and are not compared with them).")
    else:
        how = "The front holds the points that no other point beats on both objectives."
    paired = paired_view(usable, range(len(usable)))[1] is not None
    caption = (
        f"Fairness ({esc(direction_words(objectives['fairness']['better']))}) against utility "
        f"({esc(direction_words(objectives['utility']['better']))}) for every configuration"
        + (", each as its paired change against the unrepaired model (where the dashed lines cross); bars are "
           "paired 95% intervals of the change. " if paired else "; bars are confidence intervals. ")
        + f"The line joins the Pareto front. {esc(how)}{esc(_better_corner(objectives))} "
        f"Hover a point for its numbers."
    )
    missing = [p["name"] for p in points if not plottable(p)]
    note = ""
    if missing:
        note = (
            f'<p class="note">Not plotted ({len(missing)}, a non-finite fairness or utility): '
            f"{esc(', '.join(missing))}</p>"
        )
    return (
        '<section id="tradeoff"><h2>Fairness and utility</h2>'
        f'<figure id="fig-front">{front_figure(points, front, objectives)}'
        f"<figcaption>{caption}</figcaption></figure>{note}</section>"
    )


def _front_table(points, front, objectives) -> str:
    show_split = len({points[i]["split"] for i in front}) > 1
    shown = list(dict.fromkeys(n for i in front for n in (points[i].get("shown") or {})))
    guarded = any(points[i].get("excluded_by") is not None for i in front)  # runs since the guards record them
    head = [
        '<th class="num">#</th>', "<th>Name</th>", "<th>Method</th>", "<th>Kind</th>",
        f"<th class=\"num\">Fairness: {esc(objectives['fairness']['name'])} [CI]</th>",
        f"<th class=\"num\">Utility: {esc(objectives['utility']['name'])} [CI]</th>",
        '<th class="num">Fairness change vs unrepaired [paired 95% CI]</th>',
        *[f'<th class="num">{esc(n.split("/")[-1])} ({esc(n.split("/")[0])})</th>' for n in shown],
        '<th class="num">Pruned heads</th>',
    ] + (["<th>Guards (select split)</th>"] if guarded else []) + (["<th>Split</th>"] if show_split else [])
    colours = method_colours(points)
    rows = []
    for rank, i in enumerate(front, 1):
        p = points[i]
        count = n_pruned(p)
        kind = esc(p["kind"])
        cells = [
            f'<td class="num">{rank}</td>',
            f'<td class="name">{esc(p["name"])}</td>',
            f'<td><span class="swatch" style="background:{colours[p["method"]]}"></span>{esc(p["method"])}</td>',
            f'<td><span class="tag {kind}">{kind}</span></td>',
            f'<td class="num">{_value_ci(p["fairness"], p["fairness_ci"])}</td>',
            f'<td class="num">{_value_ci(p["utility"], p["utility_ci"])}</td>',
            f'<td class="num">{_table_change(p)}</td>',
            *[f'<td class="num">{esc(fmt(((p.get("shown") or {}).get(n) or {}).get("value", float("nan"))))}</td>' for n in shown],
            f'<td class="num">{"" if count is None else count}</td>',
        ] + ([f"<td>{_guards_cell(p)}</td>"] if guarded else []) + ([f"<td>{esc(p['split'])}</td>"] if show_split else [])
        excluded = " excluded" if p.get("excluded_by") else ""
        rows.append(f'<tr class="{kind}{excluded}">{"".join(cells)}</tr>')
    if not rows:
        body = f'<tr><td colspan="{len(head)}" class="note">No point could be placed on the front.</td></tr>'
    else:
        body = "".join(rows)
    return (
        '<section id="front"><h2>Pareto front</h2>'
        f'<p class="note">{len(front)} non-dominated configurations, best fairness first.</p>'
        f'<table id="table-front"><thead><tr>{"".join(head)}</tr></thead><tbody>{body}</tbody></table></section>'
    )


def _guards_cell(p) -> str:
    """Whether the guards let a configuration be chosen: a front point can be fairer than the chosen one
    only because it games kl_neutral, and the table must say so beside it."""
    failed = p.get("excluded_by")
    if p["kind"] == "base" or failed is None:
        return ""
    if not failed:
        return "passed"
    return f'<span class="worse">excluded: {esc("; ".join(failed))}</span>'


def _table_change(p) -> str:
    change = (p.get("changes") or {}).get("fairness")
    if not isinstance(change, Mapping):
        return ""
    return esc(f"{change['relative']:+.1%}") + _paired(change)


def _fits(fits, objectives) -> str:
    if not fits:
        return ""
    figures, used = [], {}
    for f in fits:
        key = f["objective"]
        used[key] = used.get(key, 0) + 1
        element_id = f"fig-fit-{key}" + ("" if used[key] == 1 else f"-{used[key]}")
        spec = objectives[key]
        svg = fit_figure(f, spec, element_id=element_id, colour=FIT_COLOURS[key])
        figures.append(
            f'<figure id="{element_id}"><h3>{esc(key.capitalize())}: {esc(spec["name"])}</h3>{svg}'
            f"<figcaption>Surrogate prediction against the measured value, one dot per configuration "
            f"in the fit data; the dashed line is y = x (a perfect fit).</figcaption></figure>"
        )
    return f'<section id="fits"><h2>Surrogate fits</h2><div class="fits">{"".join(figures)}</div></section>'


def _probes(probes) -> str:
    if not probes:
        return ""
    if probes[0].get("kind") == "fairsteer":
        caption = ("Each cell is one layer's FairSteer probe: its macro-F1 at telling the prompts where the model "
                   "leans to the concept's stereotyped groups (biased) from the rest, minus that of always naming the "
                   "more common label, on held-out prompts by cross-validation grouped by concept. Blue cells beat "
                   "the baseline: the layer's residual stream tells biased activations apart, and its gate can fire "
                   "where it should. Hover a cell for its numbers (accuracy, and the vector's norm).")
        return ('<section id="probes"><h2>Where biased activations can be detected (FairSteer probes)</h2>'
                f'<figure id="fig-probes">{probe_heatmap(probes)}<figcaption>{esc(caption)}</figcaption></figure></section>')
    caption = ("Each cell is one layer's prober for one attribute: its macro-F1 at naming the group the model "
               "favours after a prompt, minus that of always naming the most common group, measured on held-out "
               "prompts by cross-validation grouped by concept (a concept's frames are never on both sides). Blue "
               "cells beat the baseline, so that layer's MLP output carries the attribute's associations; red "
               "cells do worse. Hover a cell for its numbers.")
    return ('<section id="probes"><h2>Where the model encodes group associations (FairMed probers)</h2>'
            f'<figure id="fig-probes">{probe_heatmap(probes)}<figcaption>{esc(caption)}</figcaption></figure></section>')


def _meta_value(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"<code>{esc(json.dumps(value, default=str, ensure_ascii=False))}</code>"
    text = str(value)
    if "\n" in text or len(text) > 60 or " --" in text:
        return f"<code>{esc(text)}</code>"
    return esc(text)


def _meta(meta) -> str:
    if not meta:
        return ""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{_meta_value(v)}</dd>" for k, v in meta.items())
    return f'<section id="meta"><h2>Run</h2><dl class="meta">{rows}</dl></section>'
