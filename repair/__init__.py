"""fairness-repair: search-based fairness repair for causal language models."""

__version__ = "0.1.0"

# `repair.load(path)`: bound after the submodule is imported, so the name is the function, not the module
from repair.load import load  # noqa: E402,F401
