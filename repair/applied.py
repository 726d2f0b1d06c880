"""Interventions attached to one model together (one method's, or a stack's parts), removable as one:
what the search's stacks and the loader's stacked checkpoints both hand out."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the annotation: the CLI, which imports repair.load, builds its parser without it
    import torch


class Applied:
    """Interventions attached to one model at once, removable together. `logits(ids)` is what the
    repaired model predicts: an output transform's (the experts') combined logits when one is there."""

    def __init__(self, model, hooks: list):
        self.model, self.hooks = model, hooks
        self.transform = next((h for h in hooks if getattr(h, "transforms_outputs", False)), None)
        self.transforms_outputs = self.transform is not None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transform.logits(ids) if self.transform is not None else self.model(ids).logits

    def describe(self) -> str:
        return " + ".join(h.describe() for h in self.hooks if hasattr(h, "describe")) or "no intervention"

    def remove(self) -> None:
        for hook in reversed(self.hooks):
            hook.remove()
