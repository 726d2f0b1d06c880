"""Is the association suite's report split large enough to see a repair? The paired bootstrap 95%
half-width of the relative change in overall kl_neutral and kl_uniform, unrepaired vs repaired model,
on the report split, next to the unpaired half-width (the two sides resampled independently).

The repairs are head masks, chosen deterministically: the first 4 heads of layer 10, and the 4 heads
whose pruning the *search* split's fairness gradient (`--grad-limit` prompts per attribute) ranks
best, what a prune search seeds with, for each of the two metrics. All sides are scored in one
batched pass (one mask variant per row).

Relative change = mean(after) / mean(before) - 1 over the report split's concept prompts. Paired:
each replicate draws one set of prompt indices and uses it for both sides (`repair.stats.paired_change`
on the metrics' units); unpaired: one set each. Per prompt, a side's kl_neutral uses that side's own
neutral reference q (as `score` does; q is not resampled). The last column resamples whole concepts
(all frames of one concept together, paired), the more honest unit when a concept's frames are
correlated; the one after it resamples concepts and sentence frames at once, each independently (a
prompt weighs as much as its concept's draws times its frame's), since a split's frames are held out
too and the frames' own effect is shared by every concept rendered in them. Half-widths are (97.5th -
2.5th percentile) / 2 of the relative change, in % of the base; the last column scales the paired one
to the number of report prompts a +-3% half-width would need (1/sqrt(n)).

    .venv/bin/python benchmarks/association_power.py [--model smollm2-135m] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repair.evaluator import Evaluator  # noqa: E402
from repair.methods.prune.heads import HeadMasker, head_layout  # noqa: E402
from repair.methods.prune.masks import ranked_masks  # noqa: E402
from repair.models import ModelSpec, load_model  # noqa: E402
from repair.stats import change_from_replicates, paired_change, replicates  # noqa: E402
from repair.suites.association import AssociationSuite  # noqa: E402
from repair.suites.base import EvalConfig  # noqa: E402

METRICS = ("kl_neutral", "kl_uniform")


def half_width(interval) -> float:
    lo, hi = interval
    return (hi - lo) / 2


def clustered_paired_half_width(before, after, clusters, *, n_boot: int = 1000, seed: int = 0) -> float:
    """Paired half-width of mean(after) / mean(before) - 1, resampling whole clusters (a concept's
    prompts) with replacement: the same draws for both sides."""
    _, unit = np.unique(clusters, return_inverse=True)
    sum_b, sum_a = np.bincount(unit, before), np.bincount(unit, after)
    count = np.bincount(unit).astype(np.float64)
    n = len(count)
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, n))
    np.add.at(w, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, size=n_boot * n)), 1.0)
    rel = ((w @ sum_a) / (w @ count)) / ((w @ sum_b) / (w @ count)) - 1
    return half_width(np.percentile(rel, [2.5, 97.5]))


def crossed_paired_half_width(before, after, concepts, frames, *, n_boot: int = 1000, seed: int = 0) -> float:
    """Paired half-width of mean(after) / mean(before) - 1, resampling concepts and frames independently
    (a crossed two-way cluster bootstrap): a prompt's weight is its concept's count times its frame's."""
    _, c = np.unique(concepts, return_inverse=True)
    _, f = np.unique(frames, return_inverse=True)
    rng = np.random.default_rng(seed)
    wc = np.zeros((n_boot, c.max() + 1))
    wf = np.zeros((n_boot, f.max() + 1))
    np.add.at(wc, (np.repeat(np.arange(n_boot), wc.shape[1]), rng.integers(0, wc.shape[1], size=wc.size)), 1.0)
    np.add.at(wf, (np.repeat(np.arange(n_boot), wf.shape[1]), rng.integers(0, wf.shape[1], size=wf.size)), 1.0)
    w = wc[:, c] * wf[:, f]  # (n_boot, prompts)
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    rel = (w @ after) / (w @ before) - 1
    return half_width(np.percentile(rel[np.isfinite(rel)], [2.5, 97.5]))


def search_gradient(evaluator, masker, layout, suite, metric, chunk: int = 128) -> np.ndarray:
    """d metric / d head mask over the whole search split, in two passes so that memory holds one
    chunk's graph, not the split's (one graph over ~2,000 prompts needs more than 20 GB on CPU):
    first d metric / d option log-probs at the scored values, then per chunk of requests the
    vector-Jacobian product of those weights with the chunk's option log-probs."""
    requests = suite.requests()
    masker.set_masks(torch.ones((1, *layout)))
    leaves = [torch.tensor(o.logprob, requires_grad=True) for o in evaluator.score_choices(requests)]
    weights = torch.autograd.grad(suite.differentiable(f"overall/{metric}", leaves), leaves, allow_unused=True)
    used = [i for i, w in enumerate(weights) if w is not None]  # kl_uniform does not read the neutral prompts
    mask = torch.ones((1, *layout), requires_grad=True)
    masker.set_masks(mask)
    for start in range(0, len(used), chunk):
        idx = used[start:start + chunk]
        totals = evaluator.option_logprobs([requests[i] for i in idx])
        torch.stack([(weights[i].to(t) * t).sum() for i, t in zip(idx, totals)]).sum().backward()
    masker.set_masks(torch.ones((1, *layout)))
    return mask.grad[0].double().cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=4, help="heads pruned by each repair")
    parser.add_argument("--grad-limit", type=int, default=24,
                        help="search prompts per attribute for the gradient (a prune run uses --search-limit, 24)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(ModelSpec(args.model, device=args.device))
    layout = head_layout(loaded.model)[:2]
    masker = HeadMasker(loaded.model, torch.ones((1, *layout)))
    evaluator = Evaluator(loaded.model, loaded.tokenizer, on_rows=masker.set_rows, progress=False)
    search = AssociationSuite(EvalConfig(split="search", limit=args.grad_limit))
    report = AssociationSuite(EvalConfig(split="report"))
    print(f"{args.model} on {evaluator.device}, layout {layout}, loaded in {time.perf_counter() - t0:.1f} s")

    masks = []
    fixed = np.ones(layout, dtype=bool)
    fixed[min(10, layout[0] - 1), :args.k] = False
    masks.append((f"layer {min(10, layout[0] - 1)}, heads 0-{args.k - 1}", fixed))
    for metric in METRICS:
        grad = search_gradient(evaluator, masker, layout, search, metric)
        (m,) = ranked_masks(grad, [args.k], layout[0] * layout[1])
        heads = ",".join(f"{layer}:{head}" for layer, head in zip(*np.nonzero(~m)))
        masks.append((f"top {int((~m).sum())} by d{metric} ({heads})", m))

    t1 = time.perf_counter()
    masker.set_masks(torch.as_tensor(np.stack([np.ones(layout, bool)] + [m for _, m in masks]), dtype=torch.float32))
    outputs = evaluator.score_choices_variants(report.requests(), 1 + len(masks))
    results = [report.score(o) for o in outputs]
    n_concepts = len({p.template_id for p in report.prompts if not p.neutral})
    n_neutral = sum(p.neutral for p in report.prompts)
    print(f"report split: {len(results[0].records)} concept prompts ({n_concepts} concepts) + {n_neutral} neutral "
          f"prompts, {1 + len(masks)} variants scored in {time.perf_counter() - t1:.1f} s")

    base = results[0]
    concepts = [r["template_id"] for r in base.records]
    print(f"\n{args.n_boot} bootstrap replicates; half-widths of the relative change, in % of the base value")
    print(f"{'repair':<44} {'metric':<11} {'base':>7} {'after':>7} {'change':>8} "
          f"{'paired +-':>10} {'unpaired +-':>12} {'by concept +-':>14} {'concept x frame +-':>19} {'prompts for +-3%':>17}")
    frames = [r["frame"] for r in base.records]
    for (name, _), res in zip(masks, results[1:]):
        for metric in METRICS:
            b, a = base.metrics[f"overall/{metric}"], res.metrics[f"overall/{metric}"]
            paired = paired_change(b.units, a.units, n_boot=args.n_boot, seed=args.seed)
            unpaired = change_from_replicates(b.value, a.value,
                                              replicates(b.units.statistic, b.units.n, n_boot=args.n_boot, seed=args.seed),
                                              replicates(a.units.statistic, a.units.n, n_boot=args.n_boot, seed=args.seed + 1))
            by_concept = clustered_paired_half_width([r[metric] for r in base.records], [r[metric] for r in res.records],
                                                     concepts, n_boot=args.n_boot, seed=args.seed)
            crossed = crossed_paired_half_width([r[metric] for r in base.records], [r[metric] for r in res.records],
                                                concepts, frames, n_boot=args.n_boot, seed=args.seed)
            print(f"{name:<44} {metric:<11} {b.value:7.4f} {a.value:7.4f} {paired.relative:+8.2%} "
                  f"{half_width(paired.relative_ci):10.2%} {half_width(unpaired.relative_ci):12.2%} {by_concept:14.2%} "
                  f"{crossed:19.2%} "
                  f"{b.n * (half_width(paired.relative_ci) / 0.03) ** 2:17.0f}")
    for metric in METRICS:
        m = base.metrics[f"overall/{metric}"]
        print(f"unrepaired overall/{metric}: {m.value:.4f}, suite's 95% CI [{m.ci_low:.4f}, {m.ci_high:.4f}] "
              f"(+-{(m.ci_high - m.ci_low) / 2 / m.value:.1%} of the value)")
    masker.remove()


if __name__ == "__main__":
    main()
