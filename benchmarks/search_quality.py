"""Surrogate-guided search against random search and FASP-style knockout ranking, same LLM budget.

    python benchmarks/search_quality.py --out runs/search-quality [--budget-evals 120] [-- extra run flags]

Runs `repair run --method prune --baselines random,knockout` (resuming if OUT holds the same run) and
prints, per method, its best mask as chosen on the held-out select split (the fairest that meets the
utility constraint there), that mask's fairness on the report split and its change against the
unrepaired model there, and after how many of the method's own LLM evaluations it was first evaluated.
"""
from __future__ import annotations

import os
import sys

# benchmarks/search.py would shadow the `search` package: drop this folder from the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
from pathlib import Path

from repair.cli import main as repair_main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("runs/search-quality"))
    ap.add_argument("--budget-evals", type=int, default=120)
    ap.add_argument("extra", nargs="*", help="further `repair run` flags, after --")
    args = ap.parse_args()
    code = repair_main(["run", "--model", args.model, "--out", str(args.out), "--budget-evals", str(args.budget_evals),
                        "--baselines", "random,knockout", *args.extra])
    if code:
        return code
    methods = json.loads((args.out / "methods.json").read_text())
    base = json.loads((args.out / "candidates.jsonl").read_text().splitlines()[0])["report"]
    print(f"\nunrepaired (report split): fairness {base['fairness']:.4f}, utility {base['utility']:.4f}")
    print(f"{'method':10} {'LLM evals':>9} {'best fairness':>14} {'change':>8} {'utility':>9} {'pruned':>6} {'reached at eval':>15}")
    for name, m in methods.items():
        b = m["best"]
        if b is None:
            print(f"{name:10} {m['evaluations']:9d} {'none meets the constraint':>40}")
            continue
        change = (b["report_fairness"] - base["fairness"]) / base["fairness"]
        print(f"{name:10} {m['evaluations']:9d} {b['report_fairness']:14.4f} {change:+8.1%} {b['report_utility']:9.4f} "
              f"{len(b['config']['pruned_heads']):6d} {b['first_reached_at_evaluation']:15d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
