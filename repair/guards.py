"""The guards a repair must pass to be chosen, besides the utility bound.

`kl_neutral` compares each concept's group distribution with the neutral reference q recomputed under
the repaired model, so a transform that sends every prompt, neutral or not, to one fixed distribution
scores 0 without making anything fairer. Two guards refuse that:

- `kl_uniform` may not rise: the upper end of its paired 95% interval (relative change against the
  unrepaired model on the same split) stays at or below `max_kl_uniform_rise`;
- the reference may not move: KL(q_repaired || q_base), the mean over attributes, stays at or below
  `max_q_drift`, by default the unrepaired model's own `q_spread` on that split (how far q moves from
  which neutral concepts happen to be measured alone).

On the held-out splits a finalist failing any guard is excluded from the choice, and the reasons are
kept (`failures`). On the search split there are no paired intervals, so the search reads the point
values: a configuration past a guard scores no better than the unrepaired model, and worse the
further past it is (`guarded`), so surrogates and annealing do not spend the budget on what the
choice would refuse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from repair.objectives import Objectives, paired_changes
from repair.suites.association import q_drift

KL_UNIFORM = "association/overall/kl_uniform"
Q_SPREAD = "association/overall/q_spread"


@dataclass(frozen=True)
class Guards:
    max_kl_uniform_rise: float = 0.02  # the paired relative change's upper end, as a fraction
    max_q_drift: float | None = None  # nats; None: the unrepaired model's q_spread on the same split

    def q_bound(self, base_metrics: dict) -> float | None:
        """The q drift allowed against this unrepaired row; None where the split has no reference."""
        if self.max_q_drift is not None:
            return self.max_q_drift
        spread = base_metrics.get(Q_SPREAD)  # absent: a split with one neutral concept has no spread to bound by
        return None if spread is None else _value(spread)

    def failures(self, objectives: Objectives, base: dict, row: dict, max_loss: float, *, seed: int = 0) -> list[str]:
        """Each guard `row` fails against `base` (two held-out rows of one split, with units), in words;
        [] when it may be chosen. Guards whose metrics the split did not measure are not applied."""
        out = []
        bound = objectives.utility_bound(base["utility"], max_loss)
        if not objectives.meets(row["utility"], bound):
            name = objectives.describe()["utility"]["name"]
            out.append(f"utility: {name} {row['utility']:.4g} beyond the bound {bound:.4g} ({max_loss:.0%} of the unrepaired model's)")
        if KL_UNIFORM in base["metrics"] and KL_UNIFORM in row["metrics"]:
            change = paired_changes(objectives, base, row, seed=seed)["metrics"].get(KL_UNIFORM)
            if change is not None:
                lo, hi = change["relative_ci"]
                if not hi <= self.max_kl_uniform_rise:
                    out.append(f"kl_uniform rises: {change['relative']:+.1%} [{lo:+.1%}, {hi:+.1%}], upper end above "
                               f"{self.max_kl_uniform_rise:+.0%}")
        out += self._drift(base["metrics"], row["metrics"])
        return out

    def _drift(self, base_metrics: dict, metrics: dict) -> list[str]:
        bound, drift = self.q_bound(base_metrics), q_drift(base_metrics, metrics)
        if bound is None or math.isnan(drift) or drift <= bound:
            return []
        whose = "--max-q-drift" if self.max_q_drift is not None else "the unrepaired model's own spread"
        return [f"neutral reference moved: KL(q_repaired || q_base) {drift:.4f} above {bound:.4f} ({whose})"]

    def excess(self, base_metrics: dict, metrics: dict) -> float:
        """How far past the guards a search-split row is, from point values (0 when within): the
        kl_uniform rise beyond its allowance plus the q drift's excess over its bound, as fractions."""
        total = 0.0
        if KL_UNIFORM in base_metrics and KL_UNIFORM in metrics:
            before, after = _value(base_metrics[KL_UNIFORM]), _value(metrics[KL_UNIFORM])
            if before > 0:
                total += max(0.0, after / before - 1 - self.max_kl_uniform_rise)
        bound, drift = self.q_bound(base_metrics), q_drift(base_metrics, metrics)
        if bound and not math.isnan(drift):
            total += max(0.0, drift / bound - 1)
        return total

    def guarded(self, fairness: float, base_fairness: float, base_metrics: dict, metrics: dict) -> float:
        """The search's fairness of a row: itself within the guards; past them, no better than the
        unrepaired model's and worse by the excess (a fraction of the unrepaired model's)."""
        excess = self.excess(base_metrics, metrics)
        return fairness if excess == 0 else max(fairness, base_fairness) + abs(base_fairness) * excess


def _value(m) -> float:
    return m["value"] if isinstance(m, dict) else float(m)
