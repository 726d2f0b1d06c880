"""Surrogates + annealing on a synthetic problem shaped like the real one; prints masks/s last.

Synthetic truth (30 layers x 9 heads = 270 bits, 1 = kept):
  bias       = 0.30 + sum_h a_h p_h + a few pairwise interactions + noise(0.02)
               (a_h: mostly tiny, 12 heads that raise or lower bias by ~0.03)
  log-ppl    = log(20) + sum_h c_h p_h + 0.01 * sum_layer (pruned in layer)^2 + noise(0.005)
               (c_h lognormal: a few heads are critical)
where p_h = 1 - mask_h. Records: `--records` random masks pruning 0-20% of heads (the pilot's design).
Prints held-out fit scores (with and without the linear skip, and the CV choice), then anneals on the
chosen surrogates under "perplexity +5%" and reports the *true* values of what it found, then the speed.

Run: python benchmarks/search.py [--records 300] [--chains 2048] [--steps 300] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

# this file is named like the `search` package: drop its own folder from the path, put the repo root on it
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402

from search import TrustRegion, anneal  # noqa: E402
from surrogate import MLPEnsemble, fit_surrogate, joint_predictor  # noqa: E402
from surrogate.fit import score, split_holdout  # noqa: E402

LAYERS, HEADS = 30, 9
BITS = LAYERS * HEADS
QUICK = {"hidden": 16, "weight_decay": 1e-2, "skip": False, "group_size": HEADS}  # the usual CV winner for log-ppl


@dataclass(frozen=True, eq=False)
class Truth:
    a: np.ndarray
    pairs: np.ndarray  # (k, 2) head indices
    pair_w: np.ndarray
    c: np.ndarray

    def bias(self, masks, rng=None):
        p = 1.0 - np.asarray(masks, dtype=np.float64)
        out = 0.30 + p @ self.a + (p[:, self.pairs[:, 0]] * p[:, self.pairs[:, 1]]) @ self.pair_w
        return out + (rng.normal(0, 0.02, len(p)) if rng is not None else 0.0)

    def log_ppl(self, masks, rng=None):
        p = 1.0 - np.asarray(masks, dtype=np.float64)
        per_layer = p.reshape(len(p), LAYERS, HEADS).sum(2)
        out = np.log(20.0) + p @ self.c + 0.01 * (per_layer**2).sum(1)
        return out + (rng.normal(0, 0.005, len(p)) if rng is not None else 0.0)


def make_truth(seed: int) -> Truth:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.004, BITS)
    strong = rng.choice(BITS, 12, replace=False)
    a[strong] = rng.choice([-1, 1], 12) * rng.uniform(0.02, 0.04, 12)
    pairs = np.stack([rng.choice(BITS, 2, replace=False) for _ in range(6)])
    pair_w = rng.choice([-1, 1], 6) * 0.04
    c = rng.lognormal(np.log(0.004), 1.0, BITS)
    return Truth(a, pairs, pair_w, c)


def sample_masks(rng, n: int, design: str = "uniform", max_fraction: float = 0.2) -> np.ndarray:
    """uniform: prune k ~ U{0..20% of heads} heads; near: half of the records like that, half prune
    only 1-8 heads (where a 5% perplexity budget can be met)."""
    k = rng.integers(0, int(max_fraction * BITS) + 1, n)
    if design == "near":
        k[: n // 2] = rng.integers(1, 9, n // 2)
    elif design != "uniform":
        raise ValueError(f"unknown design {design!r}")
    masks = np.ones((n, BITS), dtype=bool)
    for i in range(n):
        masks[i, rng.choice(BITS, k[i], replace=False)] = False
    return masks[rng.permutation(n)]


def holdout_scores(X, y, params, seed):
    tr, ho = split_holdout(len(y), 0.2, seed)
    m = MLPEnsemble(**params, seed=seed).fit(X[tr], y[tr])
    return score(y[ho], m.predict(X[ho]), len(tr))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--chains", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--design", choices=("uniform", "near"), default="uniform", help="how records are sampled")
    ap.add_argument("--quick", action="store_true", help=f"fixed settings {QUICK} instead of CV model choice")
    args = ap.parse_args(argv)

    truth = make_truth(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    masks = sample_masks(rng, args.records, args.design)
    X = masks.astype(np.float64)
    targets = {"bias": truth.bias(masks, rng), "log_ppl": truth.log_ppl(masks, rng)}

    variants = {
        "ridge (skip only)": {"hidden": 0, "weight_decay": 1e-2},
        "mlp + skip": {"hidden": 16, "weight_decay": 1e-2},
        "mlp, no skip": {"hidden": 16, "weight_decay": 1e-2, "skip": False},
        "mlp + skip, layers": {"hidden": 16, "weight_decay": 1e-2, "group_size": HEADS},
        "mlp, layers": QUICK,
    }
    print(f"held-out fit, {args.records} records ({args.design} design, 80/20), 5-member ensembles:")
    for name, y in targets.items():
        for label, params in variants.items():
            t = time.perf_counter()
            s = holdout_scores(X, y, params, args.seed)
            print(f"  {name:8s} {label:19s} r2={s.r2:6.3f} spearman={s.spearman:6.3f} mae={s.mae:.4f} "
                  f"({time.perf_counter() - t:.1f}s)")

    models = {}
    for name, y in targets.items():
        t = time.perf_counter()
        if args.quick:
            model, s = fit_surrogate(X, y, seed=args.seed, candidates=[QUICK])
        else:
            model, s = fit_surrogate(X, y, seed=args.seed, group_size=HEADS)
        models[name] = model
        print(f"  {name:8s} CV choice {model.selected_params_} r2={s.r2:.3f} spearman={s.spearman:.3f} "
              f"mae={s.mae:.4f} ({time.perf_counter() - t:.1f}s)")

    predict = joint_predictor(models["bias"], models["log_ppl"])
    base = np.ones((1, BITS), dtype=bool)
    limit = float(truth.log_ppl(base)[0] + np.log(1.05))
    print(f"\ntruth at the full model: bias={truth.bias(base)[0]:.3f} ppl={np.exp(truth.log_ppl(base)[0]):.2f}; "
          f"constraint ppl <= {np.exp(limit):.2f}")
    common = dict(n_chains=args.chains, n_steps=args.steps, t0=0.02, t_end=2e-4, flips=2,
                  constraint=limit, weight=50.0, max_changed=int(0.2 * BITS), seed=args.seed)
    searches = {
        "plain (kappa=0)": dict(kappa=0.0),
        "kappa=1": dict(kappa=1.0),
        "kappa=1, trust r=8": dict(kappa=1.0, trust=TrustRegion(masks, 8, penalty=0.05)),
    }
    speeds = []
    for label, extra in searches.items():
        res = anneal(predict, BITS, **common, **extra)
        speeds.append(res.configs_per_second)
        ok = res.best.feasible
        if not ok.any():
            print(f"  {label:20s} no feasible mask found")
            continue
        i = np.flatnonzero(ok)[np.argmin(res.best_objective[ok])]
        m = res.best.configs[i : i + 1]
        tb, tp = truth.bias(m)[0], np.exp(truth.log_ppl(m)[0])
        print(f"  {label:20s} pruned={BITS - m.sum():3d} predicted bias={res.best.fairness[i]:.3f} "
              f"ppl={np.exp(res.best.utility[i]):.2f} | true bias={tb:.3f} ppl={tp:.2f} "
              f"({'meets' if np.log(tp) <= limit else 'BREAKS'} the constraint) "
              f"{res.configs_per_second:,.0f} masks/s, acceptance {res.acceptance:.2f}")
    # references: annealing on the noiseless truth itself (what a perfect surrogate would find), and the
    # best of the records (what the sample alone gives)
    def oracle(m):
        z = np.zeros(len(m), np.float32)
        return truth.bias(m).astype(np.float32), z, truth.log_ppl(m).astype(np.float32), z

    res = anneal(oracle, BITS, **{**common, "n_chains": 256, "n_steps": 3 * args.steps})
    i = int(np.argmin(res.best_objective))
    print(f"  {'oracle (truth)':20s} pruned={BITS - res.best.configs[i].sum():3d} true bias={res.best.fairness[i]:.3f} "
          f"ppl={np.exp(res.best.utility[i]):.2f}")
    feas = targets["log_ppl"] <= limit
    if feas.any():
        j = np.flatnonzero(feas)[np.argmin(targets["bias"][feas])]
        print(f"  {'best record':20s} pruned={BITS - masks[j].sum():3d} true bias={truth.bias(masks[j:j+1])[0]:.3f} "
              f"ppl={np.exp(truth.log_ppl(masks[j:j+1])[0]):.2f} ({feas.sum()} feasible records)")
    print(f"masks_per_second: {int(min(speeds))}")


if __name__ == "__main__":
    main()
