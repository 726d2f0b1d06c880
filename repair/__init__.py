"""fairness-repair: search-based fairness repair for causal language models."""

__version__ = "0.1.0"
