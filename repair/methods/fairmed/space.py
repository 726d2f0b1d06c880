"""FairMed's configurations: the treated layers and the neutralizer's setting."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from repair.methods.fairmed.neutralizer import NeutralizerSetting
from repair.methods.fairmed.probers import GATE_QUANTILES
from repair.space import BASE


LAMBDAS = (0.05, 0.1, 0.2, 0.4)
STEPS = (1, 3)


@dataclass(frozen=True)
class LayerSubsetSpace:
    """FairMed: one bit per layer (1 = untreated) and a setting (lambda, steps, gate) from a small grid;
    the target is the run's, fixed."""

    n_layers: int
    max_layers: int
    target: str = "neutral"
    method: str = "fairmed"

    @property
    def n_bits(self) -> int:
        return self.n_layers

    @property
    def max_changed(self) -> int:
        return self.max_layers

    @property
    def settings(self) -> tuple[tuple[float, int, float], ...]:
        return tuple((lam, steps, gate) for lam in LAMBDAS for steps in STEPS for gate in GATE_QUANTILES)

    def key(self, bits: np.ndarray, setting) -> str:
        layers = tuple(int(i) for i in np.nonzero(~np.asarray(bits, dtype=bool))[0])
        if not layers:
            return BASE
        lam, steps, gate = setting
        return f"{self.method}:{','.join(map(str, layers))}/lam={lam:g}/steps={steps}/gate={gate:g}/target={self.target}"

    def config(self, key: str) -> NeutralizerSetting:
        if key == BASE:
            return NeutralizerSetting(target=self.target)
        layers, *fields = key.partition(":")[2].split("/")
        values = dict(f.split("=") for f in fields)
        return NeutralizerSetting(tuple(int(l) for l in layers.split(",")), float(values["lam"]), int(values["steps"]),
                                  float(values["gate"]), values["target"])

    def bits(self, key: str) -> np.ndarray:
        bits = np.ones(self.n_layers, bool)
        bits[list(self.config(key).layers)] = False
        return bits

    def setting(self, key: str) -> tuple[float, int, float]:
        s = self.config(key)
        return (s.lam, s.steps, s.gate)

    def setting_features(self, setting) -> np.ndarray:
        """log2 lambda (0 at 0.1), steps, gate quantile: ordered, so the surrogate can interpolate."""
        lam, steps, gate = setting
        return np.array([math.log2(lam / 0.1), steps / 3.0, gate])

    def features(self, key: str) -> np.ndarray:
        setting = self.setting(key) if key != BASE else (LAMBDAS[0], STEPS[0], 0.0)
        return np.concatenate([self.bits(key).astype(np.float64), self.setting_features(setting)])

    def describe(self, key: str) -> dict:
        s = self.config(key)
        return {"layers": list(s.layers), "lambda": s.lam, "steps": s.steps, "gate": s.gate, "target": s.target}
