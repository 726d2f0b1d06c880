"""Surrogates: known answers for the fit scores, the ensemble, model choice and persistence."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import mean_absolute_error, r2_score

from surrogate import (
    ChecksumError,
    FitScores,
    MLPEnsemble,
    fit_surrogate,
    joint_predictor,
    load,
    mae,
    r2,
    rankdata,
    save,
    spearman,
)
from surrogate.fit import split_holdout

FAST = {"n_members": 5, "max_epochs": 400, "patience": 30}


def additive_task(seed=0, n=300, d=270, noise=0.05):
    """Masks pruning 0-20% of d heads; y = sum of per-head effects of the pruned heads + noise."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, int(0.2 * d) + 1, n)
    X = np.ones((n, d))
    for i in range(n):
        X[i, rng.choice(d, k[i], replace=False)] = 0.0
    effect = rng.normal(0, 0.1, d)
    y = (1 - X) @ effect + rng.normal(0, noise, n)
    return X, y, effect


# ---------------------------------------------------------------- metrics


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 20, 5]).tolist() == [2, 4, 4, 4, 1]
    assert rankdata([3.0, 1.0, 2.0]).tolist() == [3, 1, 2]


def test_spearman_hand_computed_with_ties():
    # ranks a = 1, 2.5, 2.5, 4 and b = 1, 3, 2, 4: rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / np.sqrt(10), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_r2_and_mae_match_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.normal(size=50), rng.normal(size=50)
    assert r2(y, p) == pytest.approx(r2_score(y, p), abs=1e-12)
    assert mae(y, p) == pytest.approx(mean_absolute_error(y, p), abs=1e-12)


def test_fit_scores_are_frozen_with_as_dict():
    s = FitScores(0.5, 0.7, 0.1, 240, 60)
    assert s.as_dict() == {"r2": 0.5, "spearman": 0.7, "mae": 0.1, "n_train": 240, "n_holdout": 60}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.r2 = 1.0


# ---------------------------------------------------------------- ensemble


def test_estimator_contract():
    m = MLPEnsemble(hidden=8, weight_decay=0.1, seed=3)
    assert m.get_params()["hidden"] == 8 and not hasattr(m, "weights_")
    assert clone(m).get_params() == m.get_params()
    with pytest.raises(NotFittedError):
        m.predict(np.ones((2, 4)))
    X, y, _ = additive_task(n=80, d=20)
    m.fit(X, y)
    mean, std = m.predict(X[:7], return_std=True)
    assert mean.shape == std.shape == (7,) and (std >= 0).all()
    assert m.score(X, y) == pytest.approx(r2_score(y, m.predict(X)))
    with pytest.raises(ValueError):
        m.predict(np.ones((2, 19)))


@pytest.mark.parametrize("group_size", [None, 5])
def test_linear_skip_recovers_known_coefficients(group_size):
    """y = 2 + X @ w exactly: the folded weights (centring, scaling, layer features) must give back w."""
    rng = np.random.default_rng(0)
    X = (rng.random((200, 10)) > 0.3).astype(float)
    w = np.arange(10) / 10 - 0.4
    y = 2.0 + X @ w
    m = MLPEnsemble(hidden=0, weight_decay=1e-7, group_size=group_size, **FAST).fit(X, y)
    ew = m.export_weights()
    np.testing.assert_allclose(ew.skip.mean(0), w, atol=2e-3)
    np.testing.assert_allclose(ew.b2.mean(0), 2.0, atol=2e-3)
    np.testing.assert_allclose(m.predict(X), y, atol=2e-3)


def test_ensemble_ranks_held_out_masks_of_an_additive_function():
    X, y, _ = additive_task(seed=2)
    tr, ho = split_holdout(len(y), 0.2, seed=0)
    m = MLPEnsemble(hidden=16, weight_decay=1e-2, **FAST).fit(X[tr], y[tr])
    assert spearman(y[ho], m.predict(X[ho])) > 0.8


def test_predict_torch_matches_numpy_predict():
    X, y, _ = additive_task(n=120, d=30)
    m = MLPEnsemble(hidden=8, group_size=6, **FAST).fit(X, y)
    mean, std = m.predict(X, return_std=True)
    tm, ts = m.predict_torch(torch.from_numpy(X.astype(np.float32)))
    np.testing.assert_allclose(tm.numpy(), mean, atol=1e-4)
    np.testing.assert_allclose(ts.numpy(), std, atol=1e-4)
    pred = joint_predictor(m, m)(X.astype(bool))
    assert [a.shape for a in pred] == [(120,)] * 4 and all(a.dtype == np.float32 for a in pred)
    np.testing.assert_allclose(pred[2], mean, atol=1e-4)


# ---------------------------------------------------------------- model choice


def test_fit_surrogate_scores_the_holdout_and_picks_by_cv():
    X, y, _ = additive_task(seed=4)
    cands = [{"hidden": 0, "weight_decay": 1e-2}, {"hidden": 0, "weight_decay": 30.0}]
    model, s = fit_surrogate(X, y, seed=5, candidates=cands, folds=3, base_params=FAST)
    tr, ho = split_holdout(len(y), 0.2, seed=5)
    assert (s.n_train, s.n_holdout) == (240, 60)
    pred = model.predict(X[ho])
    assert s.r2 == pytest.approx(r2_score(y[ho], pred), abs=1e-9)
    assert s.mae == pytest.approx(mean_absolute_error(y[ho], pred), abs=1e-9)
    assert s.spearman > 0.8
    # a penalty of 30 flattens the fit to the mean: CV must reject it
    assert model.selected_params_["weight_decay"] == 1e-2
    assert len(model.cv_results_) == 2 and model.cv_results_[0]["cv_r2"] > model.cv_results_[1]["cv_r2"]


def test_split_holdout_is_a_partition():
    tr, ho = split_holdout(50, 0.2, seed=1)
    assert len(ho) == 10 and sorted(np.r_[tr, ho].tolist()) == list(range(50))
    with pytest.raises(ValueError):
        split_holdout(50, 1.5, seed=1)


# ---------------------------------------------------------------- persistence


def test_save_load_roundtrip_and_checksum(tmp_path):
    X, y, _ = additive_task(n=60, d=12)
    m = MLPEnsemble(hidden=4, **FAST).fit(X, y)
    m.predict_torch(torch.ones(1, 12))  # build the torch cache: it must not be pickled
    path = tmp_path / "f.joblib"
    digest = save(m, path)
    assert len(digest) == 64
    back = load(path, digest)
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    with pytest.raises(ChecksumError, match="SHA-256"):
        load(path, "0" * 64)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ChecksumError):
        load(path, digest)
