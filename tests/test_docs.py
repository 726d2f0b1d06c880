"""The documentation: README.md stays short, and every relative link in it and in docs/*.md resolves.

A link `[text](target)` (images too) must name an existing file or folder, relative to the file that
holds it; a `#anchor` on a Markdown target must match one of that file's headings slugified as GitHub
does (lower case, punctuation other than '-' and '_' dropped, each space a '-', repeats numbered -1, -2).
Links to http(s) and mailto are not followed. Code blocks and code spans are not read for links or headings.
"""
from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
MAX_README_LINES = 250
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks and outside indented (4-space) code blocks."""
    out, fenced, prev_blank = [], False, True
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            prev_blank = False
            continue
        if fenced:
            continue
        if line.startswith("    ") and prev_blank and not line.lstrip().startswith(("-", "*", "|")):
            continue  # an indented code block (blank-line separated); it stays one until a blank line
        prev_blank = not line.strip()
        out.append(line)
    return out


def slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m[1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "``", line)
        found += LINK.findall(line)
    return found


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it to {MAX_README_LINES} and move detail to docs/"


def test_relative_links_resolve():
    # the slug rule, on headings whose GitHub anchors are known
    assert slug("Attention pruning (`repair run --method prune`)") == "attention-pruning-repair-run---method-prune"
    assert slug("Many machines: `repair worker` on PostgreSQL") == "many-machines-repair-worker-on-postgresql"
    assert slug("Bad input, tried") == "bad-input-tried"
    problems = []
    for doc in DOCS:
        for target in links(doc):
            if re.match(r"^(https?:|mailto:)", target, re.I):
                continue
            where, _, anchor = target.partition("#")
            dest = (doc.parent / where).resolve() if where else doc
            name = f"{doc.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                problems.append(f"{name}: {dest} does not exist")
            elif anchor and dest.suffix.lower() == ".md" and anchor.lower() not in anchors(dest):
                problems.append(f"{name}: no heading of {dest.relative_to(ROOT)} slugifies to #{anchor}")
    assert not problems, "\n".join(problems)
