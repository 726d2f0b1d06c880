"""Objective parsing and the arithmetic of fairness sums and utility limits, on known values."""
import math

import numpy as np
import pytest

from repair import masks as M
from repair.errors import UserError
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
