"""Why did the pilot's probers memorise, and which prober settings hold up on held-out concepts? Each
lever the issue names, on the embedded model's search-split association prompts:

- PCA dimensions: 16, 32, 64, 128, or every component ("full", the model's width);
- L2 strength: chosen per layer and attribute by grouped CV (the L2_GRID) against a fixed small 1e-3;
- the projection: pooled over every attribute's prompts (as `fit` does) against fitted on each
  attribute's prompts alone (~250 prompts for 576 dimensions: the pilot's regime);
- and a null control: the default settings on targets shuffled among an attribute's concept prompts,
  which shows how much "gain" a prober gets with no signal at all (macro-F1 rewards spreading
  predictions over groups, which the majority baseline never does).

Per variant, over every (layer, attribute) cell of the held-out scores (cross-validated, grouped by
concept): the mean of macro_f1 - majority_f1, the cells whose macro-F1 beats the majority baseline's,
mean KL(model || prober) and KL(model || training mean), their mean ratio and the cells where the
prober's KL is below the mean's, the median chosen L2, the best 5 layers by mean gain, and the fit time.

The probe data is collected once and cached in --cache (the `repair probe` activations format).

    nice -n 10 .venv/bin/python benchmarks/probers.py [--model smollm2-135m] [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repair.methods.fairmed.cache import ACTIVATIONS, best_layers, data_key, load_data_file, save_data  # noqa: E402
from repair.methods.fairmed.probers import L2_GRID, ProbeData, fit, probe_data  # noqa: E402
from repair.models import ModelSpec, load_model  # noqa: E402
from repair.suites.association import load_data  # noqa: E402
from repair.suites.base import EvalConfig  # noqa: E402

FIXED_L2 = (1e-3,)
# (name, fit keyword arguments, shuffled targets)
VARIANTS = [
    ("dims 16, CV L2, pooled", dict(dims=16), False),
    ("dims 32, CV L2, pooled", dict(dims=32), False),
    ("dims 64, CV L2, pooled (default)", dict(dims=64), False),
    ("dims 128, CV L2, pooled", dict(dims=128), False),
    ("full, CV L2, pooled", dict(dims=None), False),
    ("dims 16, L2 1e-3, pooled", dict(dims=16, l2_grid=FIXED_L2), False),
    ("dims 64, L2 1e-3, pooled", dict(dims=64, l2_grid=FIXED_L2), False),
    ("full, L2 1e-3, pooled", dict(dims=None, l2_grid=FIXED_L2), False),
    ("dims 16, CV L2, per attribute", dict(dims=16, pool_projection=False), False),
    ("dims 64, CV L2, per attribute", dict(dims=64, pool_projection=False), False),
    ("full, CV L2, per attribute", dict(dims=None, pool_projection=False), False),
    ("full, L2 1e-3, per attribute", dict(dims=None, l2_grid=FIXED_L2, pool_projection=False), False),
    ("null: default on shuffled targets", dict(dims=64), True),
]


def cached_data(args) -> ProbeData:
    config = EvalConfig(split="search", seed=args.seed)
    loaded = load_model(ModelSpec(args.model, args.device, args.dtype))
    key = data_key(loaded, config, load_data()[1])
    path = args.cache / ACTIVATIONS
    if path.exists():
        print(f"probe data: cached in {path}")
        return load_data_file(path, key)
    start = time.perf_counter()
    data = probe_data(loaded, config, progress=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    save_data(path, data, key)
    print(f"probe data: collected in {time.perf_counter() - start:.0f} s, cached in {path}")
    return data


def shuffled(data: ProbeData, seed: int) -> ProbeData:
    """The same prompts with each attribute's concept-prompt targets permuted among themselves."""
    rng = np.random.default_rng(seed)
    dists = list(data.distributions)
    for attr in data.groups:
        idx = [i for i, a in enumerate(data.attributes) if a == attr and not data.neutral[i]]
        for i, j in zip(idx, rng.permutation(idx)):
            dists[i] = data.distributions[j]
    return replace(data, distributions=tuple(dists))


def summary(scores: list[dict]) -> dict:
    gain = np.array([s["macro_f1"] - s["majority_f1"] for s in scores])
    kl, kl_mean = np.array([s["kl"] for s in scores]), np.array([s["kl_mean"] for s in scores])
    return {"gain": gain.mean(), "beats": int((gain > 0).sum()), "cells": len(scores), "kl": kl.mean(),
            "kl_mean": kl_mean.mean(), "ratio": (kl / kl_mean).mean(), "kl_below": int((kl < kl_mean).sum()),
            "l2": float(np.median([s["l2"] for s in scores])), "best": best_layers(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-probers"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the fits (their steps are small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None,
                        help="comma-separated texts: run only the variants whose name contains one of them")
    args = parser.parse_args()

    data = cached_data(args)
    torch.set_num_threads(args.threads)
    n, L, d = data.activations.shape
    per_attr = {a: sum(1 for x, neu in zip(data.attributes, data.neutral) if x == a and not neu) for a in data.groups}
    print(f"{n} prompts ({int(data.neutral.sum())} neutral), {L} layers, width {d}, {len(data.groups)} attributes; "
          f"concept prompts per attribute {min(per_attr.values())}-{max(per_attr.values())}; "
          f"L2 grid {L2_GRID}; torch threads {torch.get_num_threads()}\n")
    header = (f"{'variant':36} {'gain':>7} {'beat':>8} {'KL':>7} {'KL(mean)':>8} {'KL/mean':>7} {'KL<mean':>8} "
              f"{'L2 med':>7} {'fit s':>6}  best 5 layers")
    print(header)
    print("-" * len(header))
    for name, kwargs, shuffle in VARIANTS:
        if args.only and not any(part.strip() in name for part in args.only.split(",")):
            continue
        start = time.perf_counter()
        _, scores = fit(shuffled(data, args.seed) if shuffle else data, seed=args.seed, **kwargs)
        took = time.perf_counter() - start
        s = summary(scores)
        print(f"{name:36} {s['gain']:+7.3f} {s['beats']:>4}/{s['cells']:<3} {s['kl']:7.4f} {s['kl_mean']:8.4f} "
              f"{s['ratio']:7.3f} {s['kl_below']:>4}/{s['cells']:<3} {s['l2']:7.0e} {took:6.1f}  "
              f"{', '.join(map(str, s['best']))}", flush=True)
    print("\ngain = macro-F1 - majority-F1 (held-out, mean over cells); beat = cells with gain > 0; KL = KL(model || "
          "prober), KL(mean) = KL(model || training folds' mean), KL/mean their mean ratio; L2 med = median chosen L2")


if __name__ == "__main__":
    main()
