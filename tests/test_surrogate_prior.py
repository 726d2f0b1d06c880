"""MLPEnsemble(prior=...): a per-bit prior effect enters as one extra (folded) input."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from surrogate.mlp import MLPEnsemble


def _problem(n=60, d=90, seed=0):
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=d)
    X = (rng.random((n, d)) > 0.1).astype(float)
    y = X @ effect + 0.3 * rng.normal(size=n)
    return X, y, effect


def test_prior_helps_with_few_records_and_predicts_consistently():
    X, y, effect = _problem()
    Xt, yt, _ = _problem(n=200, seed=1)
    Xt = (np.random.default_rng(2).random((200, 90)) > 0.1).astype(float)
    yt = Xt @ effect
    noisy_prior = effect + 0.5 * np.random.default_rng(3).normal(size=90)
    plain = MLPEnsemble(hidden=0, weight_decay=3e-2, seed=0).fit(X, y)
    with_prior = MLPEnsemble(hidden=0, weight_decay=3e-2, prior=noisy_prior, seed=0).fit(X, y)
    assert spearmanr(yt, with_prior.predict(Xt))[0] > spearmanr(yt, plain.predict(Xt))[0] + 0.1
    # the prior is folded into the weights: the torch fast path agrees with predict
    import torch
    mean, _ = with_prior.predict_torch(torch.from_numpy(Xt.astype(np.float32)))
    np.testing.assert_allclose(mean.numpy(), with_prior.predict(Xt), rtol=1e-4, atol=1e-3)


def test_prior_length_is_checked():
    X, y, _ = _problem()
    with pytest.raises(ValueError, match="prior"):
        MLPEnsemble(hidden=0, prior=np.ones(5)).fit(X, y)
