"""The `repair run` flags of --method prune: light (no torch), so the command line builds without the method."""
from __future__ import annotations

from dataclasses import dataclass

from repair.methods.base import flag


@dataclass(frozen=True)
class PruneOptions:
    max_prune: float = flag(0.2, float, "largest fraction of heads a mask may prune")
