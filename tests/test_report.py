"""The HTML/CSV/JSON report: the front it finds, what the page shows, escaping, self-containment and
the all-or-nothing write."""
from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import reports.atomic
from reports import build_report, write_report
from reports.pareto import front_indices

LOWER_HIGHER = {
    "fairness": {"name": "association KL to uniform", "better": "lower"},
    "utility": {"name": "bias-free accuracy", "better": "higher"},
}
BOTH_LOWER = {
    "fairness": {"name": "association KL to uniform", "better": "lower"},
    "utility": {"name": "text perplexity", "better": "lower"},
}


def point(name, fairness, utility, *, method="prune", kind="candidate", split="report", heads=None, ci=True):
    return {
        "name": name,
        "method": method,
        "kind": kind,
        "fairness": fairness,
        "utility": utility,
        "fairness_ci": [fairness - 0.01, fairness + 0.02] if ci else None,
        "utility_ci": [utility - 0.5, utility + 0.5] if ci else None,
        "split": split,
        "config": {} if heads is None else {"pruned_heads": [[0, h] for h in range(heads)]},
    }


# Lower fairness and higher utility are better. Expected front, best fairness first: a, b, b2, c.
MIXED = [
    point("a", 0.1, 10.0, heads=1),
    point("b", 0.2, 20.0, heads=2),
    point("b2", 0.2, 20.0, heads=3, ci=False),  # exact duplicate of b: neither dominates the other
    point("c", 0.3, 30.0, heads=4),
    point("d", 0.25, 15.0, method="random", kind="baseline"),  # dominated by b
    point("e", 0.1, 5.0, method="knockout", kind="baseline"),  # same fairness as a, worse utility
    point("g", 0.4, 25.0, kind="base", method="base"),  # dominated by c
]
MIXED_FRONT = ["a", "b", "b2", "c"]

# Both lower is better. Expected front, best fairness first: p1, p2, p3, p5.
LOWER = [
    point("p1", 1.0, 5.0, kind="base", method="base"),
    point("p2", 2.0, 3.0, kind="chosen"),
    point("p3", 3.0, 1.0),
    point("p4", 2.5, 3.5, method="random", kind="baseline"),  # dominated by p2
    point("p5", 3.0, 1.0),  # duplicate of p3
    point("p6", 1.0, 6.0),  # same fairness as p1, worse utility
    point("p7", 4.0, 1.0, method="knockout", kind="baseline"),  # same utility as p3, worse fairness
]
LOWER_FRONT = ["p1", "p2", "p3", "p5"]


def front_names(points, objectives):
    directions = {k: v["better"] for k, v in objectives.items()}
    return [points[i]["name"] for i in front_indices(points, directions)]


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def figure(page: str, element_id: str) -> str:
    match = re.search(rf'<figure id="{element_id}">.*?</figure>', page, re.S)
    assert match, f"no figure {element_id}"
    return match.group(0)


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of the front table's name cells."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.table_names: list[str] = []
        self._in_table = self._in_name = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table" and attrs.get("id") == "table-front":
            self._in_table = True
        if self._in_table and tag == "td" and "name" in (attrs.get("class") or "").split():
            self._in_name = True
            self.table_names.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        if tag == "td":
            self._in_name = False

    def handle_data(self, data):
        if self._in_name:
            self.table_names[-1] += data


def parse(page: str) -> Tags:
    parser = Tags()
    parser.feed(page)
    parser.close()
    return parser


# ------------------------------------------------------------------------------------------ the front


@pytest.mark.parametrize(
    "points, objectives, expected",
    [(MIXED, LOWER_HIGHER, MIXED_FRONT), (LOWER, BOTH_LOWER, LOWER_FRONT)],
    ids=["lower-fairness-higher-utility", "both-lower"],
)
def test_front_is_the_known_non_dominated_set(points, objectives, expected):
    assert front_names(points, objectives) == expected


def test_front_depends_on_the_directions():
    # The same points with utility read as lower-is-better give a different front.
    assert front_names(MIXED, BOTH_LOWER) == ["e"]


def test_front_ignores_non_finite_values():
    points = MIXED + [point("nan", float("nan"), 99.0), point("inf", 0.0, float("inf"))]
    assert front_names(points, LOWER_HIGHER) == MIXED_FRONT


@pytest.mark.parametrize(
    "points, objectives, expected",
    [(MIXED, LOWER_HIGHER, MIXED_FRONT), (LOWER, BOTH_LOWER, LOWER_FRONT)],
    ids=["lower-fairness-higher-utility", "both-lower"],
)
def test_csv_rows_are_the_front(tmp_path, points, objectives, expected):
    write_report(tmp_path / "report", points, objectives=objectives)
    rows = read_csv(tmp_path / "report" / "pareto.csv")
    assert [r["name"] for r in rows] == expected
    by_name = {p["name"]: p for p in points}
    for row in rows:
        p = by_name[row["name"]]
        assert (row["method"], row["kind"]) == (p["method"], p["kind"])
        assert float(row["fairness"]) == p["fairness"] and float(row["utility"]) == p["utility"]
        for key in ("fairness", "utility"):
            if p[f"{key}_ci"] is None:
                assert row[f"{key}_ci_low"] == row[f"{key}_ci_high"] == ""
            else:
                assert [float(row[f"{key}_ci_low"]), float(row[f"{key}_ci_high"])] == p[f"{key}_ci"]
        heads = p["config"].get("pruned_heads")
        assert row["n_pruned"] == ("" if heads is None else str(len(heads)))
    assert list(rows[0]) == [
        "name", "method", "kind", "fairness", "fairness_ci_low", "fairness_ci_high",
        "utility", "utility_ci_low", "utility_ci_high", "n_pruned",
    ]


def test_json_holds_objectives_front_and_all_points(tmp_path):
    points = MIXED + [point("nan", float("nan"), 1.0)]
    write_report(tmp_path / "r", points, objectives=LOWER_HIGHER, meta={"model": "m"})

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads((tmp_path / "r" / "pareto.json").read_text(encoding="utf-8"), parse_constant=no_constants)
    assert doc["objectives"]["utility"]["better"] == "higher"
    assert [p["name"] for p in doc["front"]] == MIXED_FRONT
    assert [p["name"] for p in doc["points"]] == [p["name"] for p in points]
    assert [p["name"] for p in doc["points"] if p["on_front"]] == sorted(MIXED_FRONT)
    assert doc["points"][-1]["fairness"] is None  # NaN written as null
    assert doc["front"][0]["n_pruned"] == 1 and doc["meta"] == {"model": "m"}


def test_search_split_points_are_not_compared_with_report_points():
    points = LOWER + [point("search-best", 0.0, 0.0, split="search")]
    files = build_report(points, objectives=BOTH_LOWER)
    assert [r["name"] for r in csv.DictReader(io.StringIO(files["pareto.csv"]))] == LOWER_FRONT


def test_front_flags_in_the_records_are_used_when_given():
    points = [dict(p, front=p["name"] in ("p4", "p6")) for p in LOWER]
    files = build_report(points, objectives=BOTH_LOWER)
    assert [r["name"] for r in csv.DictReader(io.StringIO(files["pareto.csv"]))] == ["p6", "p4"]


# ------------------------------------------------------------------------------------------ the page


def test_main_plot_has_one_circle_per_plotted_point(tmp_path):
    points = MIXED + [point("not-plotted", float("nan"), 3.0)]
    page = write_report(tmp_path / "r", points, objectives=LOWER_HIGHER).read_text(encoding="utf-8")
    main = figure(page, "fig-front")
    assert main.count("<circle") == len(MIXED)
    front_circles = re.findall(r'<circle class="point front" data-name="([^"]*)"', main)
    assert sorted(front_circles) == sorted(MIXED_FRONT)
    assert main.count('class="front-line"') == 1
    assert "Not plotted (1" in page and "not-plotted" in page


def test_page_marks_base_and_chosen_and_labels_axes(tmp_path):
    page = write_report(tmp_path / "r", LOWER, objectives=BOTH_LOWER).read_text(encoding="utf-8")
    main = figure(page, "fig-front")
    assert "chosen: p2" in main and "base model: p1" in main
    assert "association KL to uniform (lower is better)" in main
    assert "text perplexity (lower is better)" in main
    for method in ("base", "prune", "random", "knockout"):
        assert f"{method} (" in main  # legend entry with its count
    mixed = build_report(MIXED, objectives=LOWER_HIGHER)["index.html"]
    assert "bias-free accuracy (higher is better)" in figure(mixed, "fig-front")


def test_table_lists_exactly_the_front(tmp_path):
    page = write_report(tmp_path / "r", MIXED, objectives=LOWER_HIGHER).read_text(encoding="utf-8")
    assert parse(page).table_names == MIXED_FRONT


def test_fit_figures_show_points_identity_line_and_scores():
    fits = [
        {"objective": "fairness", "predicted": [0.1, 0.2, 0.35], "measured": [0.12, 0.18, 0.3],
         "scores": {"r2": 0.8125, "spearman": 1.0, "mae": 0.0233}},
        {"objective": "utility", "predicted": [20.0, 21.0], "measured": [20.5, float("nan")],
         "scores": {"r2": None}},
        {"objective": "utility", "predicted": [1.0], "measured": [2.0], "scores": {}},
    ]
    page = build_report(LOWER, objectives=BOTH_LOWER, fits=fits)["index.html"]
    fair = figure(page, "fig-fit-fairness")
    assert fair.count("<circle") == 3 and 'class="identity"' in fair
    assert "R² = 0.812" in fair and "Spearman ρ = 1" in fair and "MAE = 0.0233" in fair
    util = figure(page, "fig-fit-utility")
    assert util.count("<circle") == 1 and "R² = n/a" in util
    assert figure(page, "fig-fit-utility-2").count("<circle") == 1


def test_meta_section_lists_the_run_details():
    meta = {"model": "SmolLM2-135M", "command": "repair search --budget 10", "date": "2025-01-01", "seed": 3}
    page = build_report(LOWER, objectives=BOTH_LOWER, meta=meta)["index.html"]
    section = re.search(r'<section id="meta">.*?</section>', page, re.S).group(0)
    for key, value in meta.items():
        assert f"<dt>{key}</dt>" in section and str(value) in section


def test_text_is_escaped():
    evil = '<script>alert("x")</script>'
    quote = 'q" onmouseover="alert(1)'
    points = [dict(p) for p in LOWER]
    points[1] = dict(points[1], name=evil)  # on the front and chosen: plot, label, table, summary
    points[2] = dict(points[2], name=quote, method="<b>m</b>")
    meta = {"<i>k</i>": "</dd><script>x</script>", "list": [evil]}
    page = build_report(
        points, objectives=BOTH_LOWER, title="<title>t</title>",
        fits=[{"objective": "fairness", "predicted": [1.0], "measured": [1.0]}], meta=meta,
    )["index.html"]
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>m</b>" not in page and "<i>k</i>" not in page and "<title>t</title>" not in page
    tags = parse(page).tags
    assert not [(t, a) for t, a in tags if any(name.startswith("on") for name in a)]
    assert parse(page).table_names[1] == evil  # the text survives, as text


def test_page_loads_nothing_from_anywhere(tmp_path):
    meta = {"model": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"}  # shown as text only
    fits = [{"objective": "fairness", "predicted": [0.1, 0.2], "measured": [0.1, 0.25], "scores": {"r2": 0.9}}]
    page = write_report(tmp_path / "r", MIXED, objectives=LOWER_HIGHER, fits=fits, meta=meta).read_text()
    tags = parse(page).tags
    names = {t for t, _ in tags}
    assert not names & {"script", "link", "img", "image", "iframe", "object", "embed", "use", "source", "video", "audio"}
    for tag, attrs in tags:
        for attr, value in attrs.items():
            if attr in ("src", "href", "xlink:href", "srcset", "action", "poster", "data", "xmlns"):
                # only the relative links to the report's own data files
                assert tag == "a" and value in ("pareto.csv", "pareto.json"), (tag, attr, value)
            assert "huggingface.co" not in (value or ""), (tag, attr)
    assert "url(" not in page and "@import" not in page
    # The only URLs in the page are the meta value, shown as text; without it there is none at all.
    assert set(re.findall(r"https?://[^\s<]*", page)) == {meta["model"]}
    plain = build_report(MIXED, objectives=LOWER_HIGHER, fits=fits)["index.html"]
    assert "http://" not in plain and "https://" not in plain
    assert "default-src 'none'" in plain  # and the browser is told to refuse any load


def test_malformed_records_are_refused_with_the_point_named():
    with pytest.raises(ValueError, match=r"points\[1\] \('p2'\).*kind"):
        build_report([LOWER[0], dict(LOWER[1], kind="finest")], objectives=BOTH_LOWER)
    with pytest.raises(ValueError, match="fairness must be a number"):
        build_report([dict(LOWER[0], fairness="0.1")], objectives=BOTH_LOWER)
    with pytest.raises(ValueError, match="better"):
        build_report(LOWER, objectives={**BOTH_LOWER, "utility": {"name": "ppl", "better": "smaller"}})
    with pytest.raises(ValueError, match="2 predicted values but 1 measured"):
        build_report(LOWER, objectives=BOTH_LOWER, fits=[{"objective": "utility", "predicted": [1, 2], "measured": [1]}])


# ------------------------------------------------------------------------------ all-or-nothing write


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_rewrite_replaces_the_report_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "report"
    write_report(out, MIXED, objectives=LOWER_HIGHER)
    write_report(out, LOWER, objectives=BOTH_LOWER)
    assert [r["name"] for r in read_csv(out / "pareto.csv")] == LOWER_FRONT
    assert sorted(os.listdir(tmp_path)) == ["report"]
    assert sorted(os.listdir(out)) == ["index.html", "pareto.csv", "pareto.json"]


def test_rewrite_keeps_other_files_in_the_folder(tmp_path):
    out = tmp_path / "report"
    write_report(out, MIXED, objectives=LOWER_HIGHER)
    (out / "notes.txt").write_text("mine")
    write_report(out, LOWER, objectives=BOTH_LOWER)
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["name"] for r in read_csv(out / "pareto.csv")] == LOWER_FRONT
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_failure_while_writing_leaves_the_previous_report_and_no_temp_dir(tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(out, MIXED, objectives=LOWER_HIGHER)
    before = snapshot(out)
    real = reports.atomic.write_file
    written = []

    def fail_on_json(path, text):
        if path.name == "pareto.json":
            raise OSError("disk full")
        real(path, text)
        written.append(path)

    monkeypatch.setattr(reports.atomic, "write_file", fail_on_json)
    with pytest.raises(OSError, match="disk full"):
        write_report(out, LOWER, objectives=BOTH_LOWER)
    assert written, "the failure should come after some files were written"
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_failure_while_swapping_puts_the_previous_report_back(tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(out, MIXED, objectives=LOWER_HIGHER)
    before = snapshot(out)
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old report moved aside; moving the new one in fails
            raise OSError("interrupted")
        return real(src, dst)

    monkeypatch.setattr(reports.atomic.os, "replace", fail_second)
    with pytest.raises(OSError, match="interrupted"):
        write_report(out, LOWER, objectives=BOTH_LOWER)
    assert calls[1][1] == "report"
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(reports.atomic, "write_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path / "report", LOWER, objectives=BOTH_LOWER)
    assert os.listdir(tmp_path) == []


def test_bad_input_fails_before_touching_the_disk(tmp_path):
    out = tmp_path / "report"
    write_report(out, MIXED, objectives=LOWER_HIGHER)
    before = snapshot(out)
    with pytest.raises(ValueError):
        write_report(out, [dict(MIXED[0], kind="?")], objectives=LOWER_HIGHER)
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["report"]


# ------------------------------------------------------------------------------------- independence


def test_reports_imports_nothing_else_from_the_project():
    package = Path(reports.atomic.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else ["reports"]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in ("repair", "search", "surrogate", "matplotlib"), f"{path.name} imports {module}"


def test_plot_coordinates_are_finite_for_degenerate_data():
    same = [point(f"s{i}", 0.5, 2.0, ci=False) for i in range(3)]
    page = build_report(same, objectives=BOTH_LOWER)["index.html"]
    main = figure(page, "fig-front")
    numbers = [float(v) for v in re.findall(r'c[xy]="([^"]+)"', main)]
    assert len(numbers) == 6 and all(math.isfinite(v) for v in numbers)


def test_every_method_configuration_is_described_in_a_few_words():
    from repair.methods import describe

    cases = [("prune", {"pruned_heads": [[0, 1], [2, 3]]}, "2 pruned heads"),
             ("fairmed", {"layers": [3, 7], "lambda": 0.1, "steps": 3, "gate": 0.5, "target": "neutral"},
              "layers 3, 7; lambda 0.1, 3 steps, gate 0.5, target neutral"),
             ("fairsteer", {"layer": 4, "alpha": 0.2, "threshold": 0.5, "gated": True}, "layer 4 steered, alpha 0.2, threshold 0.5"),
             ("fairsteer", {"layer": 4, "alpha": 0.2, "threshold": None, "gated": False}, "layer 4 steered, alpha 0.2, always on"),
             ("fairsteer", {"layer": None, "alpha": 0.0, "threshold": 0.5, "gated": True}, "no layer steered"),
             ("experts", {"alpha": 1.5, "rule": "logits"}, "experts' shift: alpha 1.5, rule logits"),
             ("experts", {"alpha": 0.0, "rule": "logits"}, "experts off"),
             ("stack", {"stack": {"prune": {"pruned_heads": [[0, 1]]}, "experts": {"alpha": 1.5, "rule": "probs"}}},
              "prune: 1 pruned heads + experts: experts' shift: alpha 1.5, rule probs"),
             ("base", {"pruned_heads": []}, "unrepaired")]
    for method, config, words in cases:
        assert describe(method, config) == words


def _change(relative, lo, hi, base):
    return {"relative": relative, "relative_ci": [lo, hi], "delta": relative * base, "delta_ci": [lo * base, hi * base],
            "significant": lo > 0 or hi < 0, "relative_defined": True}


def test_with_paired_changes_the_plot_draws_each_change_and_its_paired_interval_around_the_unrepaired_zero(tmp_path):
    """The plot's coordinates are the paired changes (percent), not the values: the unrepaired model
    sits where both dashed zero lines cross, and a repaired point's bars span its paired interval,
    far narrower than the unpaired one that would overlap everything."""
    from reports.figures import paired_view

    base = point("unrepaired", 0.24, 14.1, kind="base", method="base")
    chosen = dict(point("prune 1 head: 0:8", 0.19, 14.6, kind="chosen"),
                  changes={"fairness": _change(-0.191, -0.227, -0.153, 0.24), "utility": _change(0.035, 0.025, 0.047, 14.1)})
    other = dict(point("prune 2 heads: 0:1, 3:2", 0.22, 14.2),
                 changes={"fairness": _change(-0.08, -0.12, -0.04, 0.24), "utility": _change(0.007, -0.001, 0.015, 14.1)})
    view, units = paired_view([base, chosen, other], [0, 1, 2])
    assert units == {"fairness": " (%)", "utility": " (%)"}
    assert (view[0]["fairness"], view[0]["utility"], view[0]["fairness_ci"]) == (0.0, 0.0, None)
    assert view[1]["fairness"] == pytest.approx(-19.1) and view[1]["utility_ci"] == pytest.approx([2.5, 4.7])
    page = write_report(tmp_path / "r", [base, chosen, other], objectives=BOTH_LOWER).read_text(encoding="utf-8")
    main = figure(page, "fig-front")
    assert "change vs unrepaired (%)" in main and 'class="zero"' in main
    zero_x = float(re.search(r'class="zero" d="M([0-9.]+),', main).group(1))
    base_x = float(re.search(r'data-name="unrepaired" cx="([0-9.]+)"', main).group(1))
    assert base_x == pytest.approx(zero_x)
    labels = re.findall(r'<text class="point-label"[^>]*>([^<]*)</text>', main)
    assert sorted(labels) == sorted(["unrepaired", "chosen: prune 1 head: 0:8", "prune 2 heads: 0:1, 3:2"])
    assert "Chose <b>prune 1 head: 0:8</b>" in page and "-19.1%" in page.split('id="headline"')[1].split("</section>")[0]


def test_without_paired_changes_the_plot_keeps_the_values(tmp_path):
    from reports.figures import paired_view

    view, units = paired_view(LOWER, list(range(len(LOWER))))
    assert units is None and [v["fairness"] for v in view] == [p["fairness"] for p in LOWER]


def test_point_names_say_what_each_configuration_does():
    from repair.methods import short_name
    from repair.run import point_names

    assert short_name("prune", {"pruned_heads": [[0, 8]]}) == "prune 1 head: 0:8"
    assert short_name("fairmed", {"layers": [22, 25, 26, 27, 28, 29], "lambda": 0.1, "steps": 3, "gate": 0.0,
                                  "target": "neutral"}) == "fairmed layers 22, 25-29, lambda 0.1"
    stack = {"stack": {"experts": {"alpha": 0.75, "rule": "logits"}, "prune": {"pruned_heads": [[0, h] for h in range(5)]}}}
    assert short_name("stack", stack) == "experts alpha 0.75 + prune 5 heads"
    same = {"method": "prune", "config": {"pruned_heads": [[0, 1], [1, 1], [2, 1], [3, 1]]}}
    assert point_names([{"method": "base", "config": {}}, same, same]) == ["unrepaired", "prune 4 heads", "prune 4 heads (2)"]
