"""How far can attention-head pruning lower the association bias (kl_neutral, and kl_uniform beside it) of the embedded
default at a small perplexity cost? Two measurements that bound the answer:

1. how much of the unrepaired model's KL to uniform is the plain group prior: the KL of each
   attribute's mean distribution over the neutral prompts ("The neighbor ... was") to uniform,
   which no stereotype concept is involved in;
2. masks that prune the k heads the fairness gradient ranks best, by the search split's gradient
   (what a search can know) and by the held-out report split's own gradient (an oracle), verified
   on the report split.

    .venv/bin/python benchmarks/prune_limits.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np  # noqa: E402

from repair.methods.prune.masks import ranked_masks  # noqa: E402
from repair.methods.prune.method import Prune  # noqa: E402
from repair.models import ModelSpec, load_model  # noqa: E402
from repair.objectives import Objectives  # noqa: E402
from repair.rundir import RunConfig  # noqa: E402
from repair.runloop import Scorer, eval_config  # noqa: E402
from repair.suites.association import AssociationSuite, kl  # noqa: E402
from repair.suites.base import EvalConfig  # noqa: E402


def prior_share(scorer: Scorer) -> None:
    suite = AssociationSuite(EvalConfig(split="report", association_neutral=True))
    scorer.set_keys(["base"])
    dists = suite.distributions(scorer.evaluator.score_choices(suite.requests()))
    print(f"{'attribute':<20} {'kl_uniform':>10} {'prior KL(q||u)':>15}")
    total_u, total_p = [], []
    for attr in suite.attributes:
        idx = [i for i, p in enumerate(suite.prompts) if p.attribute == attr]
        uniform = np.full(len(suite.prompts[idx[0]].groups), 1 / len(suite.prompts[idx[0]].groups))
        q = np.mean([dists[i] for i in idx if suite.prompts[i].neutral], axis=0)
        ku = [kl(dists[i], uniform) for i in idx if not suite.prompts[i].neutral]
        total_u += ku
        total_p += [kl(q, uniform)] * len(ku)
        print(f"{attr:<20} {np.mean(ku):10.4f} {kl(q, uniform):15.4f}")
    print(f"{'overall':<20} {np.mean(total_u):10.4f} {np.mean(total_p):15.4f}  "
          f"(the prior is {np.mean(total_p) / np.mean(total_u):.0%} of the KL to uniform)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="4,8,16")
    parser.add_argument("--fairness", default="association-neutral", help="the objective whose gradient ranks heads")
    args = parser.parse_args()
    config = RunConfig(out=Path("."), model=ModelSpec(args.model), fairness=args.fairness)
    objectives = Objectives.parse(config.fairness, config.utility)
    loaded = load_model(config.model)
    prune = Prune(config, loaded.model)
    scorer = Scorer(loaded, objectives, {s: eval_config(config, s) for s in ("search", "report")}, {"prune": prune})
    layout = prune.space.layout
    print("1. group prior vs KL to uniform, unrepaired model, report split")
    prior_share(scorer)
    counts = [int(k) for k in args.counts.split(",")]
    grads = {s: scorer.objectives[s].fairness_gradient(scorer.evaluator, scorer.hooks["prune"], layout) for s in ("search", "report")}
    masks = [("unrepaired", np.ones(layout, dtype=bool))]
    for split in ("search", "report"):
        for m in ranked_masks(grads[split], counts, layout[0] * layout[1]):
            masks.append((f"top {int((~m).sum())} by {split}-split gradient" + (" (oracle)" if split == "report" else ""), m))
    rows = scorer.scorer("report")([prune.space.key(m) for _, m in masks])
    base = rows[0]
    print("\n2. gradient-ranked masks, verified on the report split")
    print(f"{'mask':<40} {'kl_neutral':>10} {'change':>8} {'kl_uniform':>10} {'change':>8} {'perplexity':>10} {'change':>8}")
    kl = lambda row, m: row["metrics"][f"association/overall/{m}"]["value"]
    for (name, _), row in zip(masks, rows):
        cells = [f"{kl(row, m):10.4f} {kl(row, m) / kl(base, m) - 1:+8.1%}" for m in ("kl_neutral", "kl_uniform")]
        print(f"{name:<40} {' '.join(cells)} {row['utility']:10.3f} {row['utility'] / base['utility'] - 1:+8.1%}")
    scorer.close()


if __name__ == "__main__":
    main()
