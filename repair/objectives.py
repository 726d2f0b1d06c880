"""The two numbers a repair search trades: fairness (lower is fairer) and utility, measured for many
configurations of one model in shared batched forwards.

Fairness is a weighted sum of suite metrics, each oriented so that lower is fairer (signed metrics
whose ideal is zero enter as the mean of their per-category absolute values). Utility is one suite metric; the search works on its
*loss* (log-perplexity, or minus accuracy), so both search objectives are minimised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from repair.errors import UserError
from repair.suites import build_suite
from repair.suites.base import EvalConfig

# name -> (suite, metric); the metric's own `better` says how it is oriented
FAIRNESS = {
    "association": ("association", "overall/kl_uniform"),
    "association-neutral": ("association", "overall/kl_neutral"),
    "bbq-margin": ("bbq", "overall/bias_margin"),
    "bbq-samb": ("bbq", "overall/s_amb"),
    "bbq-sdis": ("bbq", "overall/s_dis"),
}
# Signed metrics whose ideal is zero. Their term is the mean over categories of |category value|, not
# |overall value|: a model biased one way on Age and the other way on Religion has an overall score
# near 0, and a search would happily trade one bias for the other.
PER_CATEGORY_ABS = ("bbq-margin", "bbq-samb", "bbq-sdis")
UTILITY = {
    "text": ("text", "overall/perplexity"),
    "wikitext": ("wikitext", "overall/perplexity"),
    "mmlu": ("mmlu", "overall/accuracy"),
}


@dataclass(frozen=True)
class Objectives:
    """`fairness`: ((name, weight), ...) from FAIRNESS; `utility`: a name from UTILITY."""

    fairness: tuple[tuple[str, float], ...] = (("association", 1.0),)
    utility: str = "text"

    @classmethod
    def parse(cls, fairness: str, utility: str) -> "Objectives":
        """'association' or 'association:1,bbq-margin:0.5', and one utility name."""
        terms = []
        for part in (p.strip() for p in fairness.split(",") if p.strip()):
            name, _, weight = part.partition(":")
            if name == "pairs":
                raise UserError("--fairness pairs: the pairs suite is the check no search optimises (a repair that only "
                                "games the search's prompts shows there); every run reports it, choose another objective")
            if name not in FAIRNESS:
                raise UserError(f"unknown fairness objective {name!r} (choose from {', '.join(FAIRNESS)})")
            try:
                w = float(weight) if weight else 1.0
            except ValueError:
                raise UserError(f"fairness weight {weight!r} of {name!r} is not a number") from None
            if not w > 0:
                raise UserError(f"fairness weight of {name!r} must be positive, got {w}")
            terms.append((name, w))
        if not terms:
            raise UserError("--fairness names no objective")
        if utility not in UTILITY:
            raise UserError(f"unknown utility objective {utility!r} (choose from {', '.join(UTILITY)})")
        return cls(tuple(terms), utility)

    @property
    def suites(self) -> list[str]:
        names = [FAIRNESS[n][0] for n, _ in self.fairness] + [UTILITY[self.utility][0]]
        return list(dict.fromkeys(names))

    @property
    def utility_higher_is_better(self) -> bool:
        return self.utility == "mmlu"

    def describe(self) -> dict:
        return {
            "fairness": {"name": " + ".join(f"{w:g}*{n}" if w != 1 else n for n, w in self.fairness),
                         "metrics": [FAIRNESS[n] for n, _ in self.fairness], "better": "lower"},
            "utility": {"name": f"{self.utility} {UTILITY[self.utility][1].split('/')[-1]}",
                        "metric": UTILITY[self.utility], "better": "higher" if self.utility_higher_is_better else "lower"},
        }

    def fairness_of(self, metrics: dict) -> float:
        """metrics: {"suite/category/metric": value}; values may also be arrays of bootstrap replicates.

        A PER_CATEGORY_ABS term is the mean of |value| over the categories present; a category whose
        value is undefined (NaN: an empty denominator, e.g. no disambiguated item answered other than
        'unknown') is skipped (`skipped_categories` names them), and a term undefined in every
        category is an error naming them, so that NaN is never stored as an objective value."""
        total = 0.0
        for name, weight in self.fairness:
            suite, metric = FAIRNESS[name]
            if name not in PER_CATEGORY_ABS:
                total = total + weight * metrics[f"{suite}/{metric}"]
                continue
            values = per_category(metrics, suite, metric)
            stacked = np.abs(np.stack([np.asarray(v, dtype=np.float64) for v in values.values()]))
            finite = np.isfinite(stacked)
            if stacked.ndim == 1 and not finite.any():
                raise UserError(f"fairness objective {name} is undefined in every BBQ category "
                                f"({', '.join(values)}): no item of the kind it needs was answered other than "
                                "'unknown' (raise --search-limit/--report-limit, or choose another --fairness)")
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(finite, stacked, 0.0).sum(0) / finite.sum(0)
            total = total + weight * (float(mean) if mean.ndim == 0 else mean)
        return total

    def skipped_categories(self, metrics: dict) -> list[str]:
        """'term/category' for each category a PER_CATEGORY_ABS term left out (its value is NaN)."""
        return [f"{name}/{cat}" for name, _ in self.fairness if name in PER_CATEGORY_ABS
                for cat, v in per_category(metrics, *FAIRNESS[name]).items() if not math.isfinite(v)]

    def utility_of(self, metrics: dict) -> float:
        suite, metric = UTILITY[self.utility]
        return metrics[f"{suite}/{metric}"]

    def utility_loss(self, utility: float) -> float:
        """What the search minimises: log-perplexity, or minus accuracy."""
        return -utility if self.utility_higher_is_better else math.log(utility)

    def utility_bound(self, base_utility: float, max_loss: float) -> float:
        """The worst utility still allowed: perplexity x (1 + max_loss), or accuracy x (1 - max_loss)."""
        return base_utility * (1 - max_loss) if self.utility_higher_is_better else base_utility * (1 + max_loss)

    def meets(self, utility: float, bound: float) -> bool:
        return utility >= bound if self.utility_higher_is_better else utility <= bound


class ConfigEvaluator:
    """Scores many configurations of one model on one split's suites in shared forwards.

    The caller prepares the intervention for n variants (e.g. `HeadMasker.set_masks`) and passes an
    `Evaluator` whose `on_rows` routes each batch row to its variant.
    """

    def __init__(self, objectives: Objectives, config: EvalConfig, tokenizer, shown: dict[str, EvalConfig] | None = None):
        self.objectives = objectives
        self.config = config
        # `shown`: suites scored and kept, never an objective, each with its own limits (the transfer panel)
        self.suites = {name: build_suite(name, config, tokenizer) for name in objectives.suites}
        for name, own in (shown or {}).items():
            self.suites.setdefault(name, build_suite(name, own, tokenizer))
        self._prepared = {}
        for name, suite in self.suites.items():
            if hasattr(suite, "requests"):
                self._prepared[name] = ("choice", suite.requests())
            else:
                ids, runs = suite.runs(tokenizer)
                self._prepared[name] = ("nll", [ids[r[0].start:r[-1].stop] for r in runs], runs)

    def evaluate(self, evaluator, n_variants: int, *, keep_units: bool = False) -> list[dict]:
        """One dict per variant: fairness, utility, utility_loss and every suite metric (+ CIs); with
        `keep_units`, also the per-unit numbers of the metrics a before/after change is shown for
        (`shown_metrics`), so that changes get paired intervals."""
        per_variant: list[dict] = [{} for _ in range(n_variants)]
        for name, prepared in self._prepared.items():
            suite = self.suites[name]
            if prepared[0] == "choice":
                outputs = evaluator.score_choices_variants(prepared[1], n_variants, desc=name)
                results = [suite.score(outputs[v]) for v in range(n_variants)]
            else:
                cfg = self.config
                nlls = [evaluator.token_nll_variants(t, cfg.ppl_window, cfg.ppl_stride, n_variants, desc=name)
                        for t in prepared[1]]
                results = [suite.score(prepared[2], [n[v] for n in nlls]) for v in range(n_variants)]
            for v, res in enumerate(results):
                for key, m in res.metrics.items():
                    per_variant[v][f"{name}/{key}"] = m
        out = []
        for metrics in per_variant:
            values = {k: m.value for k, m in metrics.items()}
            utility = self.objectives.utility_of(values)
            row = {
                "fairness": self.objectives.fairness_of(values),
                "utility": utility,
                "utility_loss": self.objectives.utility_loss(utility),
                "metrics": {k: m.as_dict() for k, m in metrics.items()},
            }
            if keep_units:
                row["units"] = {k: metrics[k].units.as_dict() for k in shown_metrics(self.objectives, metrics)
                                if metrics[k].units is not None}
            out.append(row)
        return out


    def fairness_gradient(self, evaluator, masker, layout: tuple[int, int]):
        """d fairness / d head mask at the unmasked model, (layers, heads): each head's first-order
        effect (pruning head i changes fairness by about -grad[i]). One forward and backward over the
        split's fairness prompts. None when a fairness term has no differentiable form."""
        import torch

        mask = torch.ones((1, *layout), requires_grad=True)
        masker.set_masks(mask)
        total = 0.0
        for name, weight in self.objectives.fairness:
            suite_name, metric = FAIRNESS[name]
            suite, prepared = self.suites[suite_name], self._prepared[suite_name]
            value = suite.differentiable(metric, evaluator.option_logprobs(prepared[1])) \
                if hasattr(suite, "differentiable") and prepared[0] == "choice" else None
            if value is None:
                return None
            total = total + weight * value
        (grad,) = torch.autograd.grad(total, mask)
        masker.set_masks(torch.ones((1, *layout)))
        return grad[0].double().cpu().numpy()


def per_category(metrics: dict, suite: str, metric: str) -> dict:
    """{category: value} of `metric`'s per-category siblings ("bbq/Age/s_dis" for "overall/s_dis"),
    or {"overall": value} when the suite reported no categories."""
    last = metric.split("/")[-1]
    found = {k.split("/")[1]: v for k, v in metrics.items()
             if k.count("/") == 2 and k.startswith(f"{suite}/") and k.endswith(f"/{last}") and k.split("/")[1] != "overall"}
    return found or {"overall": metrics[f"{suite}/{metric}"]}


def fairness_interval(objectives: Objectives, metrics: dict) -> tuple[float, float] | None:
    """A 95% interval for a single-term fairness objective, or None: weighted sums have none of their
    own, and neither has a mean of per-category absolute values over several categories (the overall
    metric's interval says nothing about it, and the categories' intervals do not combine into one).
    With one category, the interval of |value| follows from that of the value."""
    if len(objectives.fairness) != 1:
        return None
    name, weight = objectives.fairness[0]
    suite, metric = FAIRNESS[name]
    m = metrics[f"{suite}/{metric}"]
    lo, hi = m["ci_low"], m["ci_high"]
    if name in PER_CATEGORY_ABS:
        if len(per_category(metrics, suite, metric)) > 1 or not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        lo, hi = (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
    return (weight * lo, weight * hi)


def utility_interval(objectives: Objectives, metrics: dict) -> tuple[float, float]:
    suite, metric = UTILITY[objectives.utility]
    m = metrics[f"{suite}/{metric}"]
    return (m["ci_low"], m["ci_high"])


# The association suite's two distances are always shown side by side: kl_uniform can be gamed by
# flattening the group words, kl_neutral (the stereotype part) is what repairs are judged on. The pairs
# suite, which nothing optimises, is shown wherever it was measured (a run's report split).
ALWAYS_SHOWN = ("association/overall/kl_neutral", "association/overall/kl_uniform",
                "pairs/overall/stereotype_preferred", "pairs/overall/mean_gap",
                "pairs/overall/cond_stereotype_preferred", "pairs/overall/cond_mean_gap",
                "bbq/overall/acc_ambig", "bbq/overall/acc_disambig", "bbq/overall/s_amb", "bbq/overall/s_dis")


def shown_label(key: str, better: str) -> str:
    """'kl_neutral (association, lower is better)' for 'association/overall/kl_neutral'."""
    from repair.evaluate import ARROWS

    return f"{key.split('/')[-1]} ({key.split('/')[0]}, {ARROWS[better]})"


def shown_metrics(objectives: Objectives, metrics) -> list[str]:
    """The metrics a before/after change is reported for: every metric the objectives read (all
    categories of a term, since a term may combine them), and both association distances."""
    read = [FAIRNESS[n] for n, _ in objectives.fairness] + [UTILITY[objectives.utility]]
    wanted = {(suite, metric.split("/")[-1]) for suite, metric in read}  # e.g. ("bbq", "s_amb"): every category
    names = [k for k in metrics if (k.split("/")[0], k.split("/")[-1]) in wanted]
    return list(dict.fromkeys(names + [k for k in ALWAYS_SHOWN if k in metrics]))


def paired_changes(objectives: Objectives, before: dict, after: dict, *, seed: int = 0) -> dict:
    """Changes from `before` to `after` (two evaluation rows of the same split, with "units"), each with
    a paired bootstrap 95% interval: the objectives' fairness and utility and every kept metric.

    Each metric is resampled with draws seeded by its name, identical on both sides (that is the
    pairing) and independent between metrics of different item sets. A fairness objective that
    combines several metrics is recomputed from their replicates, replicate by replicate."""
    from repair.stats import Units, change_from_replicates, metric_seed, replicates

    names = [k for k in before.get("units", {}) if k in after.get("units", {})]
    reps = {}
    for k in names:
        ub, ua = Units.from_dict(before["units"][k]), Units.from_dict(after["units"][k])
        s = metric_seed(k, seed)
        reps[k] = (replicates(ub.statistic, ub.n, seed=s), replicates(ua.statistic, ua.n, seed=s))
    changes = {k: change_from_replicates(before["metrics"][k]["value"], after["metrics"][k]["value"], *reps[k]).as_dict()
               for k in names}
    out = {"metrics": changes}
    try:
        fb = objectives.fairness_of({k: r[0] for k, r in reps.items()})
        fa = objectives.fairness_of({k: r[1] for k, r in reps.items()})
        out["fairness"] = change_from_replicates(before["fairness"], after["fairness"], fb, fa).as_dict()
    except KeyError:  # a metric the objective reads has no units: no interval for the combination
        out["fairness"] = None
    suite, metric = UTILITY[objectives.utility]
    out["utility"] = changes.get(f"{suite}/{metric}")
    return out
