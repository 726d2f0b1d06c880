"""Does a repair hold on wording the search never saw? From a finished run's records, every verified
configuration's relative change in each association metric against the unrepaired model on the split it
was searched on (`search`: the search split's concepts and frames), the one it was chosen on
(`select`) and the one only shown (`report`), with the report split's paired 95% interval, whether the
guards excluded it and why, and the Spearman correlation of the search- and select-split fairness.

    .venv/bin/python benchmarks/transfer_table.py RUN_DIR [--metric association/overall/kl_neutral]

Reads RUN_DIR/candidates.jsonl only: no model, no evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repair.runloop import search_select_correlation  # noqa: E402
from repair.methods import describe  # noqa: E402

METRICS = ("association/overall/kl_neutral", "association/overall/kl_uniform")


def change(candidate: dict, base: dict, split: str, metric: str) -> float:
    after, before = candidate[split]["metrics"][metric]["value"], base[split]["metrics"][metric]["value"]
    return after / before - 1


def table(candidates: list[dict], metrics=METRICS) -> list[str]:
    base = candidates[0]
    head = ["method", "configuration", "chosen"]
    for m in metrics:
        short = m.rsplit("/", 1)[-1]
        head += [f"{short} search", f"{short} select", f"{short} report [paired 95%]"]
    lines = ["| " + " | ".join(head + ["guards on select"]) + " |", "|" + "---|" * (len(head) + 1)]
    for c in candidates[1:]:
        if c.get("report") is None or c.get("search") is None:
            continue
        cells = [c["methods"][0] if len(c["methods"]) == 1 else "stack", describe(c["method"], c["config"]), "**yes**" if c["chosen"] else ""]
        for m in metrics:
            ci = ((c.get("changes") or {}).get("report") or {}).get("metrics", {}).get(m, {}).get("relative_ci")
            rep = f"{change(c, base, 'report', m):+.1%}" + (f" [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "")
            cells += [f"{change(c, base, 'search', m):+.1%}", f"{change(c, base, 'select', m):+.1%}", rep]
        cells.append("; ".join(c.get("excluded_by") or []) or "passed")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--metric", action="append", help="metrics to show (default: overall kl_neutral and kl_uniform)")
    args = ap.parse_args(argv)
    path = args.run_dir / "candidates.jsonl"
    if not path.is_file():
        print(f"{path} does not exist: give the folder of a finished `repair run`", file=sys.stderr)
        return 2
    candidates = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("\n".join(table(candidates, tuple(args.metric or METRICS))))
    rho = search_select_correlation(candidates)
    print(f"\nSpearman, search vs select fairness over the {rho['n']} verified configurations: {rho['spearman']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
