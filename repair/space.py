"""Configuration spaces: what a method's configurations are, as keys (records), bits (annealing) and
features (surrogates).

Every configuration is a text key `METHOD:BODY`; the unrepaired model is `base` in every space, so
one study holds every method's records and the unrepaired model is evaluated once. Annealing flips
`n_bits` free bits (1 = untouched: a kept head, an untreated layer), at most `max_changed` of them
0; a space with settings beyond the bits (FairMed's lambda, steps, gate) anneals the bits once per
setting (`settings`), and its surrogate features are the bits followed by the setting's features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from repair import masks as M
from repair.interventions.neutralizer import NeutralizerSetting
from repair.probers import GATE_QUANTILES

BASE = "base"
MIN_SAMPLES = 20  # fewer sampled configurations than this leave the surrogates nothing to learn from
STACK = "stack"  # a configuration made of several methods' configurations, applied together


def method_of(key: str) -> str | None:
    """The method a key belongs to ("stack" for a stacked one); None for the unrepaired model."""
    return None if key == BASE else key.partition(":")[0]


def parts(key: str) -> dict[str, str]:
    """The single-method keys a configuration is made of, by method: none for the unrepaired model,
    one for a method's own configuration, one per method for a stack (`stack:KEY+KEY`)."""
    if key == BASE:
        return {}
    method, _, body = key.partition(":")
    if method != STACK:
        return {method: key}
    return {method_of(k): k for k in body.split("+")}


def stack_key(keys, order) -> str:
    """The key of `keys` (of different methods, in no particular order) applied together; the parts
    are sorted by `order` (the methods' names) so the same stack always has the same key."""
    keys = sorted(keys, key=lambda k: list(order).index(method_of(k)))
    if len({method_of(k) for k in keys}) != len(keys) or len(keys) < 2 or BASE in keys:
        raise ValueError(f"a stack takes configurations of two or more different methods, got {keys}")
    return f"{STACK}:{'+'.join(keys)}"


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


ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)  # steering strength, a fraction of the layer's mean activation norm
# the gate's level, a quantile of the probe's P(biased) on the search prompts at the steered layer (so it
# fires on about 75%, 50%, 25% or 10% of them whatever the probe's calibration); None: always on. Fixed
# probabilities (0.7, 0.9) never fired on a probe whose scores stayed below them.
STEER_GATES = (None, 0.25, 0.5, 0.75, 0.9)


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
        from repair.interventions.steerer import SteerSetting

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
        from repair.interventions.experts import ExpertSetting

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
