"""Interventions attached to one model together (one method's, or a stack's parts), removable as one:
what the search's stacks and the loader's stacked checkpoints both hand out."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the annotation: the CLI, which imports repair.load, builds its parser without it
    import torch


class Applied:
    """Interventions attached to one model at once, removable together. Every part acts inside the
    model's forward (the experts' shift included), so `model(...)` is the repaired model."""

    def __init__(self, model, hooks: list):
        self.model, self.hooks = model, hooks

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits

    def describe(self) -> str:
        return " + ".join(h.describe() for h in self.hooks if hasattr(h, "describe")) or "no intervention"

    def remove(self) -> None:
        for hook in reversed(self.hooks):
            hook.remove()
