"""The `repair run` flags of --method experts: light (no torch), so the command line builds without the method."""
from __future__ import annotations

from dataclasses import dataclass

from repair.methods.base import flag


@dataclass(frozen=True)
class ExpertsOptions:
    expert_base: str | None = flag(None, str, "the model the expert and anti-expert start from, any causal LM with the "
                                              "target's tokenizer (default: the target itself); a smaller one makes "
                                              "generation cheaper")
    expert_layers: int | None = flag(None, int, "top decoder layers the experts train (default 6, or every layer of a "
                                                "smaller model); from the target itself they are stored and run as "
                                                "those layers alone over the target's own trunk")
