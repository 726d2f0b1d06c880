"""Search over configurations (bit vectors) on surrogate predictions. Numpy only: no import of `repair` or `surrogate`."""
from search.annealing import AnnealResult, Candidates, ScoredConfigs, TrustRegion, anneal, sweep
from search.pareto import nondominated_ranks, pareto_front

__all__ = [
    "AnnealResult",
    "Candidates",
    "ScoredConfigs",
    "TrustRegion",
    "anneal",
    "nondominated_ranks",
    "pareto_front",
    "sweep",
]
