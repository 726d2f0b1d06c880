"""Surrogate models configuration (bit vector, plus a method's setting features) -> objective. Numpy/torch only: no import of `repair`."""
from surrogate.fit import DEFAULT_CANDIDATES, FitScores, fit_surrogate
from surrogate.metrics import mae, r2, rankdata, spearman
from surrogate.mlp import EnsembleWeights, MLPEnsemble
from surrogate.persist import ChecksumError, load, save
from surrogate.predictor import joint_predictor

__all__ = [
    "DEFAULT_CANDIDATES",
    "ChecksumError",
    "EnsembleWeights",
    "FitScores",
    "MLPEnsemble",
    "fit_surrogate",
    "joint_predictor",
    "load",
    "mae",
    "r2",
    "rankdata",
    "save",
    "spearman",
]
