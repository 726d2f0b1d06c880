"""The HTML report in a real browser: headless Chromium opens report/index.html from file:// and we
check what a reader would see, not the HTML text (tests/test_report.py does that).

What is checked, and why:
  * console: no SEVERE message and nothing about the Content-Security-Policy. The page carries a strict
    CSP and no JavaScript, so any console error means something it holds was refused or broken.
  * network: every request the page makes is file: or data:, so it works offline from a copied folder.
    The browser is also put offline, so a page that needed the network would visibly lack something.
  * figures: each figure is displayed with a non-zero size and its plot is not blank in a screenshot.
  * table: the front table lists exactly the front's names, the front being recomputed here by brute
    force from the points, independently of reports.pareto.
  * scripts: the page holds no <script> (the report promises a page without JavaScript).

The checkers return lists of problems rather than asserting, so that the negative controls can show
that each of them does fail on a deliberately broken page. bin/ensure-chromium.sh (run by bin/test)
installs Debian's chromium and chromium-driver; the module skips only when they are still missing.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from reports import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"{CHROMIUM} or {CHROMEDRIVER} not found: run bin/ensure-chromium.sh (as root) to install "
    "Debian's chromium and chromium-driver",
)

FIGURES = ("fig-front", "fig-fit-fairness", "fig-fit-utility")
WINDOW = (1280, 1200)  # fixed, so layout and screenshots do not depend on the machine; tall enough for any plot


# ------------------------------------------------------------------------------------ the checkers


def open_page(driver, path: Path) -> None:
    """Load `path` from file:// with the logs emptied first, so they hold this page's entries only."""
    driver.get_log("browser")
    driver.get_log("performance")
    driver.get(Path(path).resolve().as_uri())


def console_problems(driver) -> list[str]:
    """SEVERE console messages, and any message about the CSP (a refused resource or inline script)."""
    out = []
    for entry in driver.get_log("browser"):
        text = entry.get("message", "")
        if entry.get("level") == "SEVERE" or "Content Security Policy" in text or "Content-Security-Policy" in text:
            out.append(f"{entry.get('level')}: {text}")
    return out


def network_problems(driver) -> list[str]:
    """URLs of requests, from the performance (DevTools) log, that are not file: or data:."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(("file:", "data:")):
                out.append(url)
    return out


def blank_problems(image: Image.Image, what: str) -> list[str]:
    """Why a screenshot looks blank, if it does.

    Content: at least 5% of the pixels differ from the most common (background) colour, and at least
    4 colours each cover 0.1% of the area. Data: the plots draw axes, grid and text in greys and the
    data marks in colour, so a frame with no data in it still fails on too few saturated pixels (a
    single marker has about 40)."""
    n = image.width * image.height
    colours = image.getcolors(maxcolors=n) or []
    if not colours:
        return [f"{what}: empty screenshot"]
    background = max(count for count, _ in colours)
    ink = 1 - background / n
    distinct = sum(count >= 0.001 * n for count, _ in colours)
    saturated = sum(count for count, rgb in colours if max(rgb) - min(rgb) > 60)
    out = []
    if ink < 0.05:
        out.append(f"{what}: only {ink:.1%} of the pixels differ from the background")
    if distinct < 4:
        out.append(f"{what}: only {distinct} colours cover 0.1% of the area or more")
    if saturated < 30:
        out.append(f"{what}: only {saturated} coloured pixels, so no data marks")
    return out


def figure_problems(driver, element_id: str) -> list[str]:
    """The figure is shown with a size, holds an <svg> plot, and a screenshot of that plot is not blank.

    The screenshot is of the plot, not the whole <figure>, because the caption's text alone would make
    the figure look non-blank; it is scrolled into view first and must come back uncropped."""
    found = driver.find_elements(By.ID, element_id)
    if len(found) != 1:
        return [f"{element_id}: {len(found)} elements with this id"]
    figure = found[0]
    plots = figure.find_elements(By.TAG_NAME, "svg")
    if not plots:
        return [f"{element_id}: no <svg> in the figure"]
    out = []
    for what, element in ((element_id, figure), (f"{element_id} plot", plots[0])):
        if not element.is_displayed():
            out.append(f"{what}: not displayed")
        size = element.size
        if size["width"] < 1 or size["height"] < 1:
            out.append(f"{what}: size {size['width']}x{size['height']}")
    if out:
        return out
    plot = plots[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", plot)
    image = Image.open(io.BytesIO(plot.screenshot_as_png)).convert("RGB")
    if abs(image.width - plot.size["width"]) > 2 or abs(image.height - plot.size["height"]) > 2:
        out.append(f"{element_id}: screenshot {image.size} is cropped from {plot.size}")
    return out + blank_problems(image, element_id)


def table_problems(driver, expected_names: list[str]) -> list[str]:
    """The front table is shown and its Name column, top to bottom, is exactly `expected_names`."""
    tables = driver.find_elements(By.ID, "table-front")
    if len(tables) != 1 or not tables[0].is_displayed():
        return [f"table-front: {len(tables)} elements with this id, or not displayed"]
    table = tables[0]
    headers = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    if "Name" not in headers:
        return [f"table-front: no Name column in {headers}"]
    column = headers.index("Name")
    names = []
    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        cells = row.find_elements(By.TAG_NAME, "td")
        names.append(cells[column].text.strip() if len(cells) > column else f"<row without a Name cell: {row.text!r}>")
    return [] if names == expected_names else [f"table-front lists {names}, expected {expected_names}"]


def check_page(driver, path: Path, expected_names: list[str]) -> dict[str, list[str]]:
    """Every check on one page, as {check: problems}; a good page gives empty lists throughout."""
    open_page(driver, path)
    problems = {"figures": [p for fid in FIGURES for p in figure_problems(driver, fid)]}
    problems["table"] = table_problems(driver, expected_names)
    scripts = len(driver.find_elements(By.TAG_NAME, "script"))
    problems["scripts"] = [f"{scripts} <script> elements"] if scripts else []
    problems["console"] = console_problems(driver)  # read last: it holds everything logged while we looked
    problems["network"] = network_problems(driver)
    return problems


def no_problems(problems: dict[str, list[str]]) -> bool:
    return not any(problems.values())


def brute_force_front(points: list[dict], better: dict[str, str]) -> list[str]:
    """Names of the points no other point dominates (at least as good on both objectives, strictly
    better on one), best fairness first; written out plainly as a second implementation."""
    def loss(p, key):
        return p[key] if better[key] == "lower" else -p[key] if better[key] == "higher" else abs(p[key])

    keys = ("fairness", "utility")
    front = [
        p for p in points
        if not any(
            all(loss(q, k) <= loss(p, k) for k in keys) and any(loss(q, k) < loss(p, k) for k in keys)
            for q in points
        )
    ]
    return [p["name"] for p in sorted(front, key=lambda p: (loss(p, "fairness"), loss(p, "utility")))]


# ------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def driver():
    """Headless Debian Chromium with console and DevTools (network) logging, offline."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                                {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        yield browser
    finally:
        browser.quit()


# ------------------------------------------------------------------------------ a hand-made report

OBJECTIVES = {
    "fairness": {"name": "association KL to uniform", "better": "lower"},
    "utility": {"name": "bias-free accuracy", "better": "higher"},
}


def _point(name, fairness, utility, method="prune", kind="candidate", heads=2):
    return {"name": name, "method": method, "kind": kind, "fairness": fairness, "utility": utility,
            "fairness_ci": [fairness - 0.02, fairness + 0.03], "utility_ci": [utility - 1.0, utility + 1.5],
            "config": {"pruned_heads": [[0, h] for h in range(heads)]}}


POINTS = [
    _point("unrepaired", 0.50, 40.0, method="base", kind="base", heads=0),
    _point("chosen-7", 0.22, 38.5, kind="chosen", heads=5),
    _point("prune-a", 0.15, 31.0, heads=8),
    _point("prune-b", 0.30, 39.0, heads=3),
    _point("prune-c", 0.35, 33.0, heads=4),  # dominated by prune-b
    _point("random-1", 0.40, 30.0, method="random", kind="baseline", heads=6),  # dominated
    _point("random-2", 0.10, 22.0, method="random", kind="baseline", heads=10),
    _point("knockout-1", 0.45, 39.5, method="knockout", kind="baseline", heads=1),
    _point("knockout-2", 0.28, 35.0, method="knockout", kind="baseline", heads=2),  # dominated by chosen-7
]
FITS = [
    {"objective": "fairness", "predicted": [0.12, 0.2, 0.33, 0.41, 0.5], "measured": [0.1, 0.22, 0.3, 0.45, 0.48],
     "scores": {"r2": 0.93, "spearman": 0.9}},
    {"objective": "utility", "predicted": [21.0, 30.5, 34.0, 39.2, 40.1], "measured": [22.0, 31.0, 33.0, 38.5, 40.5],
     "scores": {"r2": 0.97, "spearman": 1.0}},
]
EXPECTED_FRONT = brute_force_front(POINTS, {k: v["better"] for k, v in OBJECTIVES.items()})


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report"
    return write_report(out, POINTS, objectives=OBJECTIVES, fits=FITS, title="Browser test",
                        meta={"model": "hand-made", "method": "prune"})


def test_expected_front_is_what_the_points_were_made_for():
    """Guards the fixture itself: the points hold every kind and a front mixing methods."""
    assert EXPECTED_FRONT == ["random-2", "prune-a", "chosen-7", "prune-b", "knockout-1", "unrepaired"]


def test_report_renders_cleanly(driver, report):
    problems = check_page(driver, report, EXPECTED_FRONT)
    assert no_problems(problems), problems


# ------------------------------------------------------------------ negative controls: broken pages


def _svg_emptied(page: str) -> str:
    out, n = re.subn(r'(<svg id="fig-fit-utility-svg"[^>]*>).*?(</svg>)', r"\1\2", page, flags=re.S)
    assert n == 1
    return out


def _marks_removed(page: str) -> str:
    """fig-fit-fairness keeps its frame, grid, labels and score box, but loses its data points."""
    out, n = re.subn(r'(<svg id="fig-fit-fairness-svg".*?)<g class="points">.*?</g>', r"\1", page, flags=re.S)
    assert n == 1
    return out


def _row_dropped(page: str) -> str:
    out, n = re.subn(r"(<tbody>)<tr.*?</tr>", r"\1", page, count=1, flags=re.S)
    assert n == 1
    return out


def _without_csp(page: str) -> str:
    out, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    assert n == 1
    return out


def _before_body_end(page: str, html: str) -> str:
    return page.replace("</main></body>", f"</main>{html}</body>")


BROKEN = {
    # name: (how the page is broken, the check that must fail, text its problems must hold)
    "emptied-svg": (_svg_emptied, "figures", "fig-fit-utility"),
    "no-data-marks": (_marks_removed, "figures", "fig-fit-fairness: only 0 coloured pixels"),
    "hidden-figure": (lambda p: p.replace('<figure id="fig-front">', '<figure id="fig-front" hidden>'),
                      "figures", "fig-front: not displayed"),
    "dropped-row": (_row_dropped, "table", f"table-front lists {EXPECTED_FRONT[1:]}"),
    "console-error": (lambda p: _before_body_end(_without_csp(p), '<script>console.error("deliberate")</script>'),
                      "console", "deliberate"),
    "script-refused-by-csp": (lambda p: _before_body_end(p, "<script>document.title = 'x'</script>"),
                              "console", "Content Security Policy"),
    "remote-image": (lambda p: _before_body_end(_without_csp(p), '<img src="http://127.0.0.1:9/pixel.png" alt="">'),
                     "network", "http://127.0.0.1:9/pixel.png"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_checks_fail_on_a_broken_page(driver, report, tmp_path, name):
    """Each fault is caught by the check meant for it, so a clean result above is evidence."""
    breaker, check, needle = BROKEN[name]
    page = report.read_text(encoding="utf-8")
    broken = tmp_path / "index.html"
    broken.write_text(breaker(page), encoding="utf-8")
    assert broken.read_text(encoding="utf-8") != page
    problems = check_page(driver, broken, EXPECTED_FRONT)
    assert any(needle in p for p in problems[check]), problems
    if name in ("emptied-svg", "no-data-marks", "hidden-figure", "dropped-row"):  # pure layout faults: nothing else fires
        assert [k for k, v in problems.items() if v] == [check], problems


# -------------------------------------------------------------------------------- a real finished run


def test_finished_run_report_renders(driver, finished_run):
    """The report a real run writes passes the same checks; its table lists pareto.csv's names, which
    are in turn the brute-force front of all the points in pareto.json."""
    report = finished_run / "report"
    with open(report / "pareto.csv", newline="", encoding="utf-8") as f:
        csv_front = [row["name"] for row in csv.DictReader(f)]
    doc = json.loads((report / "pareto.json").read_text(encoding="utf-8"))
    better = {k: v["better"] for k, v in doc["objectives"].items()}
    finite = [p for p in doc["points"] if p["fairness"] is not None and p["utility"] is not None]
    assert csv_front and csv_front == brute_force_front(finite, better)
    problems = check_page(driver, report / "index.html", csv_front)
    assert no_problems(problems), problems


# ------------------------------------------------------------- as a person sees it: desktop and phone

SCREENS = {"desktop": (1280, 800), "phone": (390, 844)}

LAYOUT_JS = """
const vw = window.innerWidth, vh = window.innerHeight, out = [];
if (document.documentElement.scrollWidth > vw + 1)
  out.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} px wide in ${vw}`);
const scroller = (el) => el.closest('.scroll');
for (const el of document.querySelectorAll('main *')) {
  if (el.closest('svg') || el.children.length || !el.textContent.trim() || scroller(el)) continue;
  const r = el.getBoundingClientRect();
  if (r.width && (r.left < -1 || r.right > vw + 1)) out.push(`cut off: <${el.tagName.toLowerCase()}> "${el.textContent.trim().slice(0, 40)}" spans ${Math.round(r.left)}-${Math.round(r.right)} of ${vw}`);
}
for (const svg of document.querySelectorAll('svg.plot')) {
  const box = svg.getBoundingClientRect();
  const texts = [...svg.querySelectorAll('text')].filter(t => t.textContent.trim());
  for (const t of texts) {
    const r = t.getBoundingClientRect();
    if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
      out.push(`cut off in #${svg.id}: "${t.textContent.trim().slice(0, 40)}"`);
  }
  const labels = [...svg.querySelectorAll('text.point-label')].map(t => [t, t.getBoundingClientRect()]);
  for (let i = 0; i < labels.length; i++) for (let j = i + 1; j < labels.length; j++) {
    const [a, ra] = labels[i], [b, rb] = labels[j];
    if (ra.left < rb.right && rb.left < ra.right && ra.top < rb.bottom && rb.top < ra.bottom)
      out.push(`overlapping labels in #${svg.id}: "${a.textContent}" and "${b.textContent}"`);
  }
}
const head = document.getElementById('headline');
if (!head) out.push('no #headline');
else if (head.getBoundingClientRect().bottom > vh) out.push(`#headline ends at ${Math.round(head.getBoundingClientRect().bottom)} px, below the first screen (${vh})`);
return out;
"""


def layout_problems(driver, path: Path, screen: str, shot: Path | None = None) -> list[str]:
    """At the screen size `screen` (the viewport exactly, not the window): nothing cut off at the page's
    edges or an SVG's, no two point labels overlapping, the headline (what was chosen, how much
    fairer, at what cost) within the first screen; `shot` gets a screenshot of that first screen."""
    width, height = SCREENS[screen]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    try:
        open_page(driver, path)
        problems = driver.execute_script(LAYOUT_JS)
        if shot is not None:
            driver.save_screenshot(str(shot))
            if Image.open(shot).size != (width, height):
                problems.append(f"screenshot {Image.open(shot).size} is not the {width}x{height} screen")
        return problems
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.mark.parametrize("screen", SCREENS)
def test_a_run_report_reads_on_a_desktop_and_a_phone(driver, all_run, screen, tmp_path):
    """The report of a run of every method (stacks, long names): checked, and a screenshot of the first
    screen taken, at 1280x800 and at 390x844; every point of the front plot carries its name there."""
    shot = tmp_path / f"report-{screen}.png"
    assert layout_problems(driver, all_run / "report" / "index.html", screen, shot) == []
    assert blank_problems(Image.open(shot).convert("RGB"), screen) == []
    page = (all_run / "report" / "index.html").read_text(encoding="utf-8")
    doc = json.loads((all_run / "report" / "pareto.json").read_text(encoding="utf-8"))
    plot = re.search(r'<figure id="fig-front">.*?</figure>', page, re.S).group(0)
    labels = re.findall(r'<text class="point-label"[^>]*>([^<]*)</text>', plot)
    assert len(labels) == len(doc["points"]) and "not labelled" not in page
    assert not any(re.fullmatch(r"[a-z]+-[0-9a-f]{6}", p["name"]) for p in doc["points"])  # no internal keys


def _label_moved_onto_another(page: str) -> str:
    xs = re.findall(r'<text class="point-label" x="([^"]+)" y="([^"]+)"', page)
    (x0, y0), (x1, y1) = xs[0], xs[1]
    return page.replace(f'<text class="point-label" x="{x1}" y="{y1}"', f'<text class="point-label" x="{x0}" y="{y0}"', 1)


LAYOUT_BROKEN = {
    "overlapping-labels": (_label_moved_onto_another, "overlapping labels in #fig-front-svg"),
    "wide-line": (lambda p: p.replace("</main>", '<p style="white-space:nowrap">' + "wide " * 400 + "</p></main>"),
                  "the page scrolls sideways"),
    "headline-pushed-down": (lambda p: p.replace('<section id="headline">', '<div style="height:900px"></div><section id="headline">'),
                             "below the first screen"),
}


@pytest.mark.parametrize("name", LAYOUT_BROKEN)
def test_layout_checks_fail_on_a_broken_page(driver, all_run, tmp_path, name):
    breaker, needle = LAYOUT_BROKEN[name]
    page = (all_run / "report" / "index.html").read_text(encoding="utf-8")
    broken = tmp_path / "index.html"
    broken.write_text(breaker(page), encoding="utf-8")
    assert broken.read_text(encoding="utf-8") != page
    assert any(needle in p for p in layout_problems(driver, broken, "desktop")), name
