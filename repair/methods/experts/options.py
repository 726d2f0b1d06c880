"""The `repair run` flags of --method experts: light (no torch), so the command line builds without the method."""
from __future__ import annotations

from dataclasses import dataclass

from repair.methods.base import flag

# the top decoder layers the experts train when --expert-layers is unset: the best measured trade of
# 2, 4, 6 and 8 on SmolLM2-135M (docs/results.md, "the effect of --expert-layers")
DEFAULT_LAYERS = 8


@dataclass(frozen=True)
class ExpertsOptions:
    expert_base: str | None = flag(None, str, "the model the expert and anti-expert start from, any causal LM with the "
                                              "target's tokenizer (default: the target itself); a smaller one makes "
                                              "generation cheaper")
    expert_layers: int | None = flag(None, int, f"top decoder layers the experts train (default {DEFAULT_LAYERS}, or every "
                                                "layer of a smaller model); from the target itself they are stored and "
                                                "run as those layers alone over the target's own trunk",
                                     unset=DEFAULT_LAYERS)
