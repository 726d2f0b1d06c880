"""Annealing and Pareto fronts on objectives whose optimum is known."""
from __future__ import annotations

import numpy as np
import pytest

from search import TrustRegion, anneal, nondominated_ranks, pareto_front, sweep
from search.annealing import _distinct_positions, _hamming

D = 24
# fairness = sum of w over pruned bits: pruning a bit with negative w helps
W = np.array([-3, -2.5, -2, -1.5, -1, -0.5] + [1.0] * (D - 6))
# utility cost: bits 0 and 1 (the two best) cost 1 each, bits 2-5 cost 0.25 each
C = np.array([1.0, 1.0, 0.25, 0.25, 0.25, 0.25] + [0.0] * (D - 6))
ANNEAL = dict(n_chains=32, n_steps=1500, t0=1.0, t_end=1e-3, flips=3, seed=0)


def separable(std_bits=None):
    def predict(masks):
        pruned = 1.0 - masks
        z = np.zeros(len(masks), np.float32)
        fs = z if std_bits is None else (pruned[:, std_bits].sum(1) * 2.0).astype(np.float32)
        return (pruned @ W).astype(np.float32), fs, (pruned @ C).astype(np.float32), z

    return predict


def mask_pruning(*bits):
    m = np.ones(D, bool)
    m[list(bits)] = False
    return m


def best_chain(res):
    i = int(np.argmin(res.best_objective))
    return res.best.configs[i], res.best_objective[i]


def test_unconstrained_optimum_prunes_exactly_the_helpful_bits():
    res = anneal(separable(), D, **ANNEAL)
    mask, obj = best_chain(res)
    np.testing.assert_array_equal(mask, mask_pruning(0, 1, 2, 3, 4, 5))
    assert obj == pytest.approx(-10.5)
    assert res.n_evaluated == 32 * 1501 and 0 < res.acceptance < 1


def test_max_changed_is_a_hard_cap():
    res = anneal(separable(), D, max_changed=3, **ANNEAL)
    mask, obj = best_chain(res)
    np.testing.assert_array_equal(mask, mask_pruning(0, 1, 2))
    assert obj == pytest.approx(-7.5)
    assert (D - res.best.configs.sum(1) <= 3).all() and (D - res.final.configs.sum(1) <= 3).all()


@pytest.mark.parametrize("weight", [np.inf, 20.0])
def test_utility_constraint_is_respected(weight):
    # utility <= 1.25 allows bit 0 or 1 (cost 1) plus one cheap bit, or the four cheap bits 2-5 (cost 1):
    # the best value is -5 (bits 0+2, or bits 2-5: a tie, so only the value is checked)
    res = anneal(separable(), D, constraint=1.25, weight=weight, **ANNEAL)
    mask, obj = best_chain(res)
    assert obj == pytest.approx(-5.0)
    feas = res.best.feasible
    assert feas.all() and (res.best.utility[feas] <= 1.25 + 1e-6).all()
    assert ((1.0 - mask) @ C) <= 1.25


def test_trust_region_keeps_masks_near_evaluated_ones():
    evaluated = np.ones((1, D), bool)  # only the full model was evaluated
    res = anneal(separable(), D, trust=TrustRegion(evaluated, 2, penalty=10.0), **ANNEAL)
    mask, obj = best_chain(res)
    np.testing.assert_array_equal(mask, mask_pruning(0, 1))
    assert (D - res.best.configs[res.best.feasible].sum(1) <= 2).all()
    # the tuple form is accepted too, and distance to the nearest of several evaluated masks counts
    far = mask_pruning(0, 1, 2, 3, 4, 5)
    res = anneal(separable(), D, trust=(np.stack([evaluated[0], far]), 0), **ANNEAL)
    np.testing.assert_array_equal(best_chain(res)[0], far)


def test_uncertainty_penalty_avoids_bits_the_ensemble_disagrees_on():
    # bits 0 and 1 help by 3 and 2.5 but carry std 2 each: with kappa=2 they cost more than they give
    res = anneal(separable(std_bits=[0, 1]), D, kappa=2.0, **ANNEAL)
    np.testing.assert_array_equal(best_chain(res)[0], mask_pruning(2, 3, 4, 5))
    res = anneal(separable(std_bits=[0, 1]), D, kappa=0.0, **ANNEAL)
    np.testing.assert_array_equal(best_chain(res)[0], mask_pruning(0, 1, 2, 3, 4, 5))


def test_seeded_runs_repeat_and_bad_starts_are_refused():
    a = anneal(separable(), D, **{**ANNEAL, "n_steps": 50})
    b = anneal(separable(), D, **{**ANNEAL, "n_steps": 50})
    np.testing.assert_array_equal(a.final.configs, b.final.configs)
    with pytest.raises(ValueError):
        anneal(separable(), D, start=mask_pruning(0, 1, 2, 3), max_changed=2, **ANNEAL)
    with pytest.raises(ValueError):
        anneal(separable(), D, start=np.ones((3, D), bool), **ANNEAL)


def test_sweep_pools_unique_candidates_including_the_optimum():
    cands = sweep(separable(), D, weights=[0.0, 1.0, np.inf], constraint=1.25,
                  **{k: v for k, v in ANNEAL.items() if k != "seed"})
    keys = {m.tobytes() for m in cands.configs}
    assert len(keys) == len(cands)
    assert set(cands.weight.tolist()) <= {0.0, 1.0, np.inf}
    # weight 0 ignores the constraint: its chains reach the unconstrained optimum, flagged infeasible
    i = [k for k, m in enumerate(cands.configs) if (m == mask_pruning(0, 1, 2, 3, 4, 5)).all()]
    assert len(i) == 1 and not cands.feasible[i[0]] and cands.fairness[i[0]] == pytest.approx(-10.5)
    assert cands.fairness[cands.feasible].min() == pytest.approx(-5.0)
    assert (cands.utility[cands.feasible] <= 1.25 + 1e-6).all()


def test_distinct_positions_and_hamming():
    pos = _distinct_positions(np.random.default_rng(0), 2000, 5, 4)
    assert pos.min() >= 0 and pos.max() < 5
    assert all(len(set(r)) == 4 for r in pos.tolist())
    counts = np.bincount(pos.ravel(), minlength=5)
    assert counts.min() > 0.9 * counts.mean()  # uniform over bits
    a = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    b = np.array([[0, 1, 0, 1]], bool)
    assert _hamming(a, b).tolist() == [[2], [2]]


# ---------------------------------------------------------------- Pareto

POINTS = np.array([
    [1.0, 5.0],  # 0 front
    [2.0, 3.0],  # 1 front
    [2.0, 4.0],  # 2 dominated by 1 (same first, worse second)
    [3.0, 3.0],  # 3 dominated by 1 (worse first, same second)
    [4.0, 1.0],  # 4 front
    [2.0, 3.0],  # 5 duplicate of 1: kept
    [5.0, 2.0],  # 6 dominated by 4
    [np.nan, 0.0],  # 7 never on the front
])


def test_pareto_front_min_min():
    assert pareto_front(POINTS).tolist() == [0, 1, 5, 4]


def test_pareto_front_directions():
    # maximise the second objective instead: the front is the top-left staircase
    assert pareto_front(POINTS, ("min", "max")).tolist() == [0]
    pts = np.array([[0.1, 10.0], [0.2, 12.0], [0.3, 11.0], [0.05, 9.0]])
    # minimise bias, maximise accuracy
    assert pareto_front(pts, ("min", "max")).tolist() == [3, 0, 1]
    with pytest.raises(ValueError):
        pareto_front(pts, ("min", "up"))


def test_nondominated_ranks():
    assert nondominated_ranks(POINTS).tolist() == [0, 0, 1, 1, 0, 0, 1, -1]
