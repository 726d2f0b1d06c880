"""Bootstrap intervals and paired intervals of changes, against hand-computed answers."""
import numpy as np
import pytest

from repair.stats import Units, mean_metric, paired_change, ratio_metric, replicates


def mean_units(values):
    return Units(((np.asarray(values, np.float64), None, 1.0, 0.0),))


def test_paired_interval_on_two_units_is_the_enumerated_one():
    # Two units: a resample is (0,0), (0,1), (1,0) or (1,1) with probability 1/4 each, so the change in
    # the mean is 1, 2, 2 or 3: its 2.5% and 97.5% percentiles are exactly 1 and 3.
    change = paired_change(mean_units([0.0, 0.0]), mean_units([1.0, 3.0]))
    assert change.delta == 2.0 and change.delta_ci == (1.0, 3.0) and change.significant
    # relative: mean(after) / mean(before) - 1 over the same four resamples: 1, 1/3, 1/3, 0
    change = paired_change(mean_units([1.0, 2.0]), mean_units([2.0, 2.0]))
    assert change.relative == pytest.approx(2 / 1.5 - 1)
    assert change.relative_ci == pytest.approx((0.0, 1.0))


def test_constant_shift_has_a_zero_width_paired_interval_but_wide_unpaired_ones():
    before = np.arange(20, dtype=np.float64)
    after = before + 0.5
    change = paired_change(mean_units(before), mean_units(after))
    assert change.delta_ci == pytest.approx((0.5, 0.5))
    m_before, m_after = mean_metric(before, "lower"), mean_metric(after, "lower")
    assert m_before.ci_high - m_before.ci_low > 4  # each side alone varies a lot
    assert m_after.ci_low < m_before.value < m_after.ci_high  # so unpaired, the shift looks like noise


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(0)
    before = rng.normal(1.0, 0.5, size=300) ** 2
    after = 0.9 * before + rng.normal(0, 0.02, size=300) ** 2
    paired = paired_change(mean_units(before), mean_units(after))
    # unpaired: each side resampled on its own (independent draws), the change of the two replicates
    unpaired = replicates(mean_units(after).statistic, 300, seed=1) - replicates(mean_units(before).statistic, 300, seed=2)
    lo, hi = np.percentile(unpaired, [2.5, 97.5])
    assert paired.delta_ci[1] - paired.delta_ci[0] < 0.25 * (hi - lo)
    assert paired.delta_ci[0] <= paired.delta <= paired.delta_ci[1] and paired.significant


def test_units_reproduce_ratio_perplexity_and_s_amb_forms():
    num, den = np.array([1.0, 0, 1, 1]), np.array([1.0, 1, 1, 0])
    m = ratio_metric(num, den, "closer-to-zero", scale=2.0, offset=-1.0)
    assert m.value == pytest.approx(2 * 3 / 3 - 1)
    ppl = Units(((np.array([2.0, 4.0]), np.array([1.0, 3.0]), 1.0, 0.0),), exp=True)
    assert ppl.statistic(np.ones((1, 2)))[0] == pytest.approx(np.exp(6 / 4))
    s_amb = Units(((np.array([1.0, 0, 0]), None, -1.0, 1.0), (np.array([1.0, 1, 0]), np.array([1.0, 1, 1]), 2.0, -1.0)),
                  zero_when_empty=True)
    assert s_amb.statistic(np.ones((1, 3)))[0] == pytest.approx((1 - 1 / 3) * (2 * 2 / 3 - 1))
    assert s_amb.statistic(np.array([[0.0, 0, 0]]))[0] == 0.0
    assert Units.from_dict(s_amb.as_dict()).statistic(np.ones((1, 3)))[0] == s_amb.statistic(np.ones((1, 3)))[0]


def test_paired_change_refuses_different_units():
    with pytest.raises(ValueError, match="same units"):
        paired_change(mean_units([1.0, 2.0]), mean_units([1.0]))


def test_clustered_mean_resamples_whole_clusters():
    from repair.stats import clustered_mean_metric

    # clusters a = (0, 0, 0) and b = (2): resampling clusters gives a+a, a+b, b+a, b+b with item means
    # 0, 0.5, 0.5, 2 (b+b: 2 items of value 2); the point value is the plain item mean 0.5
    m = clustered_mean_metric([0.0, 0.0, 0.0, 2.0], ["a", "a", "a", "b"], "lower")
    assert m.value == 0.5 and m.n == 4 and (m.ci_low, m.ci_high) == (0.0, 2.0)
    # resampled item by item instead, the interval would be narrower than the cluster one
    flat = mean_metric([0.0, 0.0, 0.0, 2.0], "lower")
    assert flat.ci_high < 2.0


def test_a_change_of_a_signed_metric_near_zero_is_shown_absolute():
    """Ratios to a before side whose replicates cross zero mean nothing: the absolute change is shown."""
    from repair.stats import Units, format_change, paired_change

    before = Units(((np.array([1.0, -1.2, 0.3, -0.2, 0.1, 0.2]), None, 1.0, 0.0),))
    after = Units(((np.array([0.0, -1.5, 0.0, -0.6, 0.0, -0.3]), None, 1.0, 0.0),))
    change = paired_change(before, after, seed=1)
    assert not change.relative_defined
    assert format_change(change.as_dict()).startswith(f"{change.delta:+.4g} [")
    assert "(absolute)" in format_change(change.as_dict())
    positive = paired_change(Units(((np.array([1.0, 2.0, 3.0]), None, 1.0, 0.0),)),
                             Units(((np.array([1.0, 1.0, 2.0]), None, 1.0, 0.0),)), seed=1)
    assert positive.relative_defined and format_change(positive.as_dict()).startswith("-33.3% [")
