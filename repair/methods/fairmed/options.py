"""The `repair run` flags of --method fairmed: light (no torch), so the command line builds without the method."""
from __future__ import annotations

from dataclasses import dataclass

from repair.methods.base import flag


@dataclass(frozen=True)
class FairMedOptions:
    max_layers: int = flag(10, int, "the most layers a configuration may treat")
    target: str = flag("neutral", str, "steer the probers' group distribution towards 'neutral' (the neutral-context "
                                       "distribution, default) or 'uniform' (the paper's)")
