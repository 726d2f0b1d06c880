"""Held-out evaluation with and without the shared forward (repair.fanout), side by side in one process.

    python benchmarks/shared_forward.py --model smollm2-135m --data-dir ../shared/data --layers 10,20,25

A batch of `--variants` configurations (the unrepaired model and head masks that first change layer
l, for each l of --layers) is scored on the select split's suites, as `repair run` verifies its
finalists: once with every row running its own forward (separate), once sharing the layers below l.
Checks that both give the same numbers, then prints for each l the seconds of each, their ratio
(`speedup at layer l: X.XX`) and the ratio of decoder-layer work the sharing removes in theory,
(variants x depth) / (l + variants x (depth - l)). Separate forwards cost the same whatever l is, so
they are timed once, before and after the shared runs, and averaged.
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
from repair.methods.prune.heads import HeadMasker, head_layout
from repair.models import ModelSpec, load_model
from repair.objectives import ConfigEvaluator, Objectives
from repair.rundir import RunConfig
from repair.runloop import eval_config


def masks(n_layers: int, n_heads: int, layer: int, n: int, seed: int = 0) -> np.ndarray:
    """The unrepaired model and n - 1 masks of one to three heads each, all in `layer` and above, one at `layer`."""
    rng = np.random.default_rng(seed)
    out = np.ones((n, n_layers, n_heads), np.float32)
    for v in range(1, n):
        out[v, layer, rng.integers(n_heads)] = 0
        for _ in range(rng.integers(3)):
            out[v, rng.integers(layer, n_layers), rng.integers(n_heads)] = 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--layers", default="10,20,25", help="comma-separated first changed layers")
    ap.add_argument("--variants", type=int, default=8, help="configurations per batch (repair run's --batch-masks)")
    ap.add_argument("--limit", type=int, default=None, help="items per attribute/category (default: the whole split)")
    args = ap.parse_args()

    loaded = load_model(ModelSpec(args.model))
    model, tokenizer = loaded.model, loaded.tokenizer
    n_layers, n_heads, _ = head_layout(model)
    objectives = Objectives.parse("association-neutral", "text")
    config = RunConfig(out=Path("."), data_dir=args.data_dir, report_limit=args.limit)
    suites = ConfigEvaluator(objectives, eval_config(config, "select"), tokenizer)
    layers = [int(x) for x in args.layers.split(",")]
    masker = HeadMasker(model, masks(n_layers, n_heads, layers[0], args.variants))
    separate = Evaluator(model, tokenizer, on_rows=masker.set_rows, progress=False)
    shared = Evaluator(model, tokenizer, on_rows=masker.set_rows, progress=False, first_layer=masker.first_layer)
    print(f"{args.model}: {n_layers} layers, {args.variants} configurations a batch, select split"
          f"{'' if args.limit is None else f' (limit {args.limit})'}; shared forward checked: {shared.shares_trunk}")

    def timed(evaluator, layer):
        masker.set_masks(masks(n_layers, n_heads, layer, args.variants))
        start = time.perf_counter()
        rows = suites.evaluate(evaluator, args.variants)
        return time.perf_counter() - start, rows

    separate_seconds, results = [], {}
    for layer in layers:
        if not separate_seconds:
            seconds, want = timed(separate, layer)
            separate_seconds.append(seconds)
        results[layer] = timed(shared, layer)
    seconds, want_last = timed(separate, layers[-1])
    separate_seconds.append(seconds)
    # the numbers agree: the first and the last layer's masks, scored both ways
    for want_rows, (_, got_rows) in ((want, results[layers[0]]), (want_last, results[layers[-1]])):
        for a, b in zip(want_rows, got_rows):
            assert abs(a["fairness"] - b["fairness"]) <= 1e-4 * (1 + abs(a["fairness"])), (a["fairness"], b["fairness"])
            assert abs(a["utility"] - b["utility"]) <= 1e-4 * (1 + abs(a["utility"])), (a["utility"], b["utility"])
    base = float(np.mean(separate_seconds))
    print(f"separate forwards: {base:.1f} s (runs: {', '.join(f'{s:.1f}' for s in separate_seconds)})")
    v, d = args.variants, n_layers
    for layer in layers:
        seconds = results[layer][0]
        print(f"shared below layer {layer}: {seconds:.1f} s; layer work removed in theory "
              f"{v * d / (layer + v * (d - layer)):.2f}x")
    for layer in layers:
        print(f"speedup at layer {layer}: {base / results[layer][0]:.2f}")


if __name__ == "__main__":
    main()
