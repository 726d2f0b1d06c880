"""Attention pruning's configurations: one bit per query head."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repair.methods.prune import masks as M
from repair.space import BASE


@dataclass(frozen=True)
class HeadMaskSpace:
    """Attention pruning: one bit per query head, layers x heads, 1 = kept."""

    layout: tuple[int, int]
    max_prune: float
    method: str = "prune"
    settings = (None,)

    @property
    def n_bits(self) -> int:
        return self.layout[0] * self.layout[1]

    @property
    def max_changed(self) -> int:
        return int(np.floor(self.max_prune * self.n_bits))

    def key(self, bits: np.ndarray, setting=None) -> str:
        bits = np.asarray(bits, dtype=bool)
        return BASE if bits.all() else f"{self.method}:{M.to_key(bits.reshape(self.layout))}"

    def bits(self, key: str) -> np.ndarray:
        return np.ones(self.n_bits, bool) if key == BASE else M.from_key(key.partition(":")[2], self.layout).ravel()

    def setting(self, key: str):
        return None

    def features(self, key: str) -> np.ndarray:
        return self.bits(key).astype(np.float64)

    def setting_features(self, setting) -> np.ndarray:
        return np.zeros(0)

    def config(self, key: str) -> np.ndarray:
        """What the intervention takes: the (layers, heads) keep mask."""
        return self.bits(key).reshape(self.layout)

    def describe(self, key: str) -> dict:
        return {"pruned_heads": M.pruned_heads(self.config(key))}
