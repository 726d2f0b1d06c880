"""The batch callable that annealing needs, built from two fitted ensembles.

Why a separate adapter: `search/` only knows `predict(configs) -> (f_mean, f_std, u_mean, u_std)` on numpy
arrays, so it can run on any model; this one feeds both ensembles through their fused torch fast path.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from surrogate.mlp import MLPEnsemble

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def joint_predictor(fairness: MLPEnsemble, utility: MLPEnsemble, *, threads: int = 1) -> Predict:
    """(n, d) 0/1 configurations (bool or float) -> float32 arrays (fairness mean, std, utility mean, std).

    Runs torch on `threads` threads (restored after each call): for a few thousand configurations per call one
    thread measured ~0.45M head masks/s on this 2-core machine under load, two threads 0.03M.
    """
    fairness.export_weights()
    utility.export_weights()

    def predict(configs: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(configs, dtype=np.float32))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            f_mean, f_std = fairness.predict_torch(x)
            u_mean, u_std = utility.predict_torch(x)
        finally:
            torch.set_num_threads(before)
        return f_mean.numpy(), f_std.numpy(), u_mean.numpy(), u_std.numpy()

    return predict
