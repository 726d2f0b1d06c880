"""Each item alone against items sharing prefix trees (repair.packing), side by side in one process.

    python benchmarks/trees.py --model smollm2-135m --data-dir ../shared/data

Scores the multiple-choice suites a default `repair run` scores (the search split's association
prompts, the report split's association prompts, the pairs suite and, with --data-dir holding BBQ, the
report split's BBQ panel) with the unrepaired model twice: once with every item in its own row
(`row_tokens=1`: its prompt shared by its options only, as before the trees) and once with the default
trees. Checks that both give the same scores (within 1e-4 per option token: a pair's sentence sums
float32 log-probs of a dozen tokens or more), then prints for each suite the tokens
through the decoder blocks and the seconds of each, and their ratios (`<suite>: tokens X.XXx, time
X.XXx`). The per-item pass is timed before and after the trees and averaged, so a drifting machine
hits both sides alike.
"""
from __future__ import annotations

import os
import sys

# benchmarks/search.py would shadow the `search` package: drop this folder from the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import time
from pathlib import Path

import numpy as np

from repair.evaluator import Evaluator
from repair.models import ModelSpec, load_model
from repair.objectives import ConfigEvaluator, Objectives
from repair.rundir import RunConfig
from repair.runloop import eval_config, panel


def timed(evaluator: Evaluator, requests) -> tuple[list, float, int]:
    evaluator.work.__init__()
    start = time.perf_counter()
    out = evaluator.score_choices(requests)
    return out, time.perf_counter() - start, evaluator.work.tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()

    loaded = load_model(ModelSpec(args.model))
    model, tokenizer = loaded.model, loaded.tokenizer
    objectives = Objectives.parse("association-neutral", "text")
    config = RunConfig(out=Path("."), data_dir=args.data_dir)
    suites = {}
    for split in ("search", "report"):
        cfg = eval_config(config, split)
        shown = panel(cfg, config.panel_bbq_limit) if split == "report" else None
        for name, (kind, *prepared) in ConfigEvaluator(objectives, cfg, tokenizer, shown)._prepared.items():
            if kind == "choice":
                suites[f"{split} {name}"] = prepared[0]
    alone = Evaluator(model, tokenizer, row_tokens=1, progress=False)
    trees = Evaluator(model, tokenizer, progress=False)
    alone.score_choices(next(iter(suites.values()))[:8])  # warm-up (allocator, kernels)
    ok = True
    print(f"model {loaded.source}; {alone.device}; row_tokens {trees.row_tokens}")
    for name, requests in suites.items():
        first, first_s, alone_tokens = timed(alone, requests)
        shared, trees_s, trees_tokens = timed(trees, requests)
        _, second_s, _ = timed(alone, requests)
        alone_s = (first_s + second_s) / 2
        diff = max(float((np.abs(a.logprob - b.logprob) / a.n_tokens).max()) for a, b in zip(first, shared))
        ok &= diff <= 1e-4
        print(f"{name}: {len(requests)} items; tokens {alone_tokens} alone, {trees_tokens} in trees; "
              f"{alone_s:.1f} s alone ({first_s:.1f}, {second_s:.1f}), {trees_s:.1f} s in trees; max |difference| per token {diff:.1e}")
        print(f"{name}: tokens {alone_tokens / trees_tokens:.2f}x, time {alone_s / trees_s:.2f}x")
    if not ok:
        print("MISMATCH between items alone and in trees", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
