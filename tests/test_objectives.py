"""Objective parsing and the arithmetic of fairness sums and utility limits, on known values."""
import math

import numpy as np
import pytest

from repair.errors import UserError
from repair.methods.prune import masks as M
from repair.objectives import Objectives, fairness_interval


def test_weighted_fairness_uses_absolute_bbq_scores():
    obj = Objectives.parse("association:2,bbq-samb:0.5", "text")
    metrics = {"association/overall/kl_uniform": 0.3, "bbq/overall/s_amb": -0.4, "text/overall/perplexity": 20.0}
    assert obj.fairness_of(metrics) == pytest.approx(2 * 0.3 + 0.5 * 0.4)
    assert obj.suites == ["association", "bbq", "text"]


def test_utility_limits_by_direction():
    ppl = Objectives.parse("association", "text")
    assert ppl.utility_bound(20.0, 0.05) == pytest.approx(21.0)
    assert ppl.meets(20.9, 21.0) and not ppl.meets(21.1, 21.0)
    assert ppl.utility_loss(20.0) == pytest.approx(math.log(20.0))
    acc = Objectives.parse("association", "mmlu")
    assert acc.utility_bound(0.40, 0.05) == pytest.approx(0.38)
    assert acc.meets(0.39, 0.38) and not acc.meets(0.37, 0.38)
    assert acc.utility_loss(0.4) == pytest.approx(-0.4)


def test_interval_of_an_absolute_score_straddling_zero():
    obj = Objectives.parse("bbq-sdis", "text")
    m = {"bbq/overall/s_dis": {"value": 0.1, "ci_low": -0.2, "ci_high": 0.3}}
    assert fairness_interval(obj, m) == (0.0, 0.3)
    m["bbq/Age/s_dis"] = m["bbq/overall/s_dis"]  # one category: the overall value is that category's
    assert fairness_interval(obj, m) == (0.0, 0.3)


def test_no_interval_for_a_mean_of_absolute_values_over_categories():
    obj = Objectives.parse("bbq-sdis", "text")
    m = {f"bbq/{c}/s_dis": {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1}
         for c, v in (("Age", 0.3), ("Religion", -0.3), ("overall", 0.0))}
    assert fairness_interval(obj, m) is None


@pytest.mark.parametrize("name, metric", [("bbq-sdis", "s_dis"), ("bbq-samb", "s_amb"), ("bbq-margin", "bias_margin")])
def test_opposite_biases_in_two_categories_do_not_cancel(name, metric):
    obj = Objectives.parse(name, "text")
    metrics = {f"bbq/Age/{metric}": 0.4, f"bbq/Religion/{metric}": -0.2, f"bbq/overall/{metric}": 0.1,
               "bbq/Age/acc_ambig": 0.9, "text/overall/perplexity": 20.0}
    assert obj.fairness_of(metrics) == pytest.approx(0.3)  # mean of |0.4| and |-0.2|, not |0.1|


def test_a_category_with_an_empty_denominator_is_skipped_and_named():
    obj = Objectives.parse("bbq-sdis:2,association", "text")
    metrics = {"bbq/Age/s_dis": math.nan, "bbq/Religion/s_dis": -0.2, "bbq/overall/s_dis": -0.2,
               "association/overall/kl_uniform": 0.5}
    value = obj.fairness_of(metrics)
    assert math.isfinite(value) and value == pytest.approx(2 * 0.2 + 0.5)
    assert obj.skipped_categories(metrics) == ["bbq-sdis/Age"]


def test_a_term_undefined_in_every_category_is_an_error_naming_them():
    obj = Objectives.parse("bbq-sdis", "text")
    metrics = {"bbq/Age/s_dis": math.nan, "bbq/Religion/s_dis": math.nan, "bbq/overall/s_dis": math.nan}
    with pytest.raises(UserError, match=r"bbq-sdis is undefined in every BBQ category \(Age, Religion\)"):
        obj.fairness_of(metrics)


def test_bootstrap_replicates_combine_replicate_by_replicate():
    obj = Objectives.parse("bbq-samb", "text")
    reps = {"bbq/Age/s_amb": np.array([0.1, np.nan, 0.5]), "bbq/Religion/s_amb": np.array([-0.3, -0.3, np.nan]),
            "bbq/overall/s_amb": np.array([0.0, 0.0, 0.0])}
    assert obj.fairness_of(reps) == pytest.approx(np.array([0.2, 0.3, 0.5]))


@pytest.mark.parametrize("fairness, utility, message", [
    ("vibes", "text", "unknown fairness objective"), ("association:x", "text", "is not a number"),
    ("association:-1", "text", "must be positive"), ("", "text", "names no objective"),
    ("association", "bleu", "unknown utility objective"),
])
def test_bad_objectives(fairness, utility, message):
    with pytest.raises(UserError, match=message):
        Objectives.parse(fairness, utility)


def test_mask_keys_and_sampling():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 9)) > 0.2
    assert np.array_equal(M.from_key(M.to_key(mask), (30, 9)), mask)
    assert M.pruned_heads(np.array([[1, 0], [0, 1]], bool)) == [[0, 1], [1, 0]]
    masks = M.stratified_masks(100, (30, 9), 0.2, seed=1)
    pruned = np.array([(~m).sum() for m in masks])
    assert pruned.min() >= 1 and pruned.max() <= 54
    assert np.median(pruned) <= 54 / 4 + 1  # light pruning sampled densely
    assert [M.to_key(m) for m in masks] == [M.to_key(m) for m in M.stratified_masks(100, (30, 9), 0.2, seed=1)]
    knock = M.knockout_masks((2, 3))
    assert len(knock) == 6 and all((~m).sum() == 1 for m in knock)


def test_paired_changes_of_the_objectives_follow_their_metrics():
    """The objective's change is its metric's paired change; both association distances are kept."""
    import numpy as np

    from repair.objectives import Objectives, paired_changes, shown_metrics
    from repair.stats import mean_metric, ratio_metric

    rng = np.random.default_rng(0)
    kl_before = rng.random(40)
    sides = {}
    for name, kl_n in (("before", kl_before), ("after", 0.8 * kl_before + 0.01 * rng.random(40))):
        metrics = {"association/overall/kl_neutral": mean_metric(kl_n, "lower"),
                   "association/overall/kl_uniform": mean_metric(kl_n + 1, "lower"),
                   "association/gender/kl_uniform": mean_metric(kl_n[:5] + 1, "lower"),
                   "text/overall/perplexity": ratio_metric(np.full(8, 20.0) * (1 if name == "before" else 1.03), np.full(8, 10.0), "lower")}
        objectives = Objectives.parse("association-neutral", "text")
        assert shown_metrics(objectives, metrics) == ["association/overall/kl_neutral", "text/overall/perplexity",
                                                       "association/overall/kl_uniform"]
        sides[name] = {"fairness": metrics["association/overall/kl_neutral"].value,
                       "utility": metrics["text/overall/perplexity"].value,
                       "metrics": {k: m.as_dict() for k, m in metrics.items()},
                       "units": {k: metrics[k].units.as_dict() for k in shown_metrics(objectives, metrics)}}
    changes = paired_changes(objectives, sides["before"], sides["after"])
    assert changes["fairness"] == changes["metrics"]["association/overall/kl_neutral"]
    assert changes["fairness"]["relative"] == pytest.approx(sides["after"]["fairness"] / sides["before"]["fairness"] - 1)
    assert changes["fairness"]["significant"] and changes["fairness"]["relative_ci"][1] < 0
    assert changes["utility"]["relative"] == pytest.approx(0.03)
    assert set(changes["metrics"]) == {"association/overall/kl_neutral", "association/overall/kl_uniform", "text/overall/perplexity"}
