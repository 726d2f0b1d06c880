"""FairSteer's configurations: the steered layer, the strength and the gate."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repair.methods.fairsteer.steerer import SteerSetting
from repair.methods.fairsteer.steering import STEER_GATES
from repair.space import BASE


ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)  # steering strength, a fraction of the layer's mean activation norm


@dataclass(frozen=True)
class SteerLayerSpace:
    """FairSteer: one bit per layer (1 = not steered, at most one steered) and a setting (alpha,
    gate quantile level) from a small grid. Small enough (layers x settings) for the surrogates to score every
    configuration: `enumerate` replaces annealing."""

    n_layers: int
    method: str = "fairsteer"
    # per layer, the probe's P(biased) at each STEER_GATES level but None (`Steering.gates`); known once fitted
    gates: tuple[tuple[float, ...], ...] | None = None
    max_changed = 1

    @property
    def n_bits(self) -> int:
        return self.n_layers

    @property
    def settings(self) -> tuple[tuple[float, float | None], ...]:
        return tuple((a, t) for a in ALPHAS for t in STEER_GATES)

    def key(self, bits: np.ndarray, setting) -> str:
        layers = np.nonzero(~np.asarray(bits, dtype=bool))[0]
        if not len(layers):
            return BASE
        if len(layers) > 1:
            raise ValueError(f"FairSteer steers one layer, got {len(layers)}")
        alpha, level = setting
        gate = "always" if level is None else f"gate=q{level:g}"
        return f"{self.method}:{int(layers[0])}/alpha={alpha:g}/{gate}"

    def config(self, key: str):
        if key == BASE:
            return SteerSetting()
        layer, alpha, _ = key.partition(":")[2].split("/")
        level = self.level(key)
        if level is not None and self.gates is None:
            raise ValueError("the gate's quantiles are not known before the probes are fitted")
        threshold = None if level is None else self.gates[int(layer)][STEER_GATES.index(level) - 1]
        return SteerSetting(int(layer), float(alpha.partition("=")[2]), threshold)

    @staticmethod
    def level(key: str) -> float | None:
        """The gate's quantile level of a key (None: always on)."""
        gate = key.rpartition("/")[2]
        return None if gate == "always" else float(gate.partition("=q")[2])

    def bits(self, key: str) -> np.ndarray:
        bits = np.ones(self.n_layers, bool)
        if key != BASE:
            bits[int(key.partition(":")[2].split("/")[0])] = False
        return bits

    def setting(self, key: str) -> tuple[float, float | None]:
        return (float(key.split("/")[1].partition("=")[2]), self.level(key))

    def setting_features(self, setting) -> np.ndarray:
        """alpha, the gate's quantile level (0 when always on) and an always-on flag."""
        alpha, level = setting
        return np.array([alpha, 0.0 if level is None else level, float(level is None)])

    def features(self, key: str) -> np.ndarray:
        setting = self.setting(key) if key != BASE else (0.0, 1.0)
        return np.concatenate([self.bits(key).astype(np.float64), self.setting_features(setting)])

    def enumerate(self) -> list[str]:
        """Every configuration but the unrepaired model."""
        out = []
        for layer in range(self.n_layers):
            bits = np.ones(self.n_layers, bool)
            bits[layer] = False
            out += [self.key(bits, s) for s in self.settings]
        return out

    def describe(self, key: str) -> dict:
        s = self.config(key)
        return {"layer": s.layer, "alpha": s.alpha, "threshold": s.threshold, "gated": s.threshold is not None,
                "quantile": None if key == BASE else self.level(key)}
