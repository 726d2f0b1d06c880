"""The decoding-time experts' configurations: a combination rule and a strength."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repair.space import BASE


# the experts' strength per combination rule: a logit difference and a probability difference live on
# different scales (a probability difference is at most 1, so it needs a larger alpha to matter)
EXPERT_ALPHAS = {"logits": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0), "probs": (2.0, 5.0, 10.0, 20.0, 50.0)}


@dataclass(frozen=True)
class ExpertSpace:
    """Decoding-time experts: a (rule, alpha) pair from a small grid and no bits. Every configuration
    is the same three forwards combined another way, so the whole grid is evaluated at once (the
    seed) and nothing is left for surrogates to choose."""

    method: str = "experts"
    n_bits = 0
    max_changed = 0

    @property
    def settings(self) -> tuple[tuple[str, float], ...]:
        return tuple((rule, a) for rule, alphas in EXPERT_ALPHAS.items() for a in alphas)

    def key(self, bits, setting) -> str:
        rule, alpha = setting
        return BASE if alpha == 0 else f"{self.method}:rule={rule}/alpha={alpha:g}"

    def config(self, key: str):
        from repair.methods.experts.transform import ExpertSetting

        if key == BASE:
            return ExpertSetting()
        rule, alpha = (f.partition("=")[2] for f in key.partition(":")[2].split("/"))
        return ExpertSetting(float(alpha), rule)

    def bits(self, key: str) -> np.ndarray:
        return np.zeros(0, bool)

    def setting(self, key: str) -> tuple[str, float]:
        s = self.config(key)
        return (s.rule, s.alpha)

    def setting_features(self, setting) -> np.ndarray:
        """alpha relative to its rule's largest, and the rule."""
        rule, alpha = setting
        return np.array([alpha / max(EXPERT_ALPHAS[rule]), float(rule == "probs")])

    def features(self, key: str) -> np.ndarray:
        return self.setting_features(self.setting(key))

    def enumerate(self) -> list[str]:
        return [self.key(None, s) for s in self.settings]

    def describe(self, key: str) -> dict:
        s = self.config(key)
        return {"alpha": s.alpha, "rule": s.rule}
