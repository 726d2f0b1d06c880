"""FairSteer: a probe per layer detects biased activations in the residual stream; a debiasing
vector is added at one layer only where the probe fires. The layer, the strength and the gate's
threshold (or always on) are searched.

The published rule, a sweep over layers at one setting (the paper picks its layer this way), is the
seed's first part and is kept as its own sequence, `layer-sweep`; the always-on configurations the
search evaluated form the sequence `always-on`. Both are verified and reported like the search, so
the report shows whether the search beats the sweep and whether the gate beats steering everywhere.
The space is layers x ALPHAS x STEER_GATES (900 configurations on a 30-layer model): the surrogates
score every one of them each round instead of annealing. A gate level is a quantile of the probe's
P(biased) on the search prompts at its layer, so every level fires on a known share of them.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from repair.errors import UserError
from repair.methods import artifacts
from repair.methods.base import Method
from repair.methods.fairsteer import steering
from repair.methods.fairsteer.space import SteerLayerSpace
from repair.methods.fairsteer.steerer import SteerSetting, Steerer
from repair.methods.fairsteer.steering import Steering, residual_modules
from repair.space import BASE, MIN_SAMPLES

SWEEP_SETTING = (0.3, 0.5)  # the layer sweep's (alpha, gate quantile): the pilot's gated steering, firing on half the prompts
ARTIFACT = "fairsteer/steering"


class FairSteer(Method):
    name = "fairsteer"
    seed_phases = ("layer-sweep", "sample")
    seed_description = "sampling steering configurations"
    budget_share = 0.25
    explanation = ("The vector is alpha x the layer's mean activation norm; the layer's probe decides where it "
                   "is added.")
    setting_flags = ("layers", "alpha", "threshold")

    def __init__(self, config, model):
        self.config, self.options = config, self.options_of(config)
        self.space = SteerLayerSpace(len(residual_modules(model)))  # refuses a model without decoder layers
        self.steering: Steering | None = None
        self.scores: list[dict] = []

    @classmethod
    def check_config(cls, config, names) -> None:
        if "knockout" in config.baselines and names[0] == "fairsteer":
            raise UserError("--baselines knockout knocks out attention heads: a baseline of --method prune, not fairsteer")
        labels = cls.options_of(config).steer_labels
        if labels not in steering.LABELS:
            raise UserError(f"--steer-labels must be {' or '.join(steering.LABELS)}, got {labels!r}")
        if labels == "bbq" and config.data_dir is None:
            raise UserError("--steer-labels bbq labels BBQ items, which need the benchmark data: pass --data-dir (the "
                            "folder that holds bbq/) or set $REPAIR_DATA_DIR")

    @classmethod
    def extra_suites(cls, config) -> tuple[str, ...]:
        return ("bbq",) if cls.options_of(config).steer_labels == "bbq" else ()  # the published labelling reads BBQ

    @classmethod
    def describe(cls, config: dict) -> str:
        if config["layer"] is None:
            return "no layer steered"
        gate = ("always on" if config["threshold"] is None else f"threshold {config['threshold']:.3g}"
                + (f" (q{config['quantile']:g})" if config.get("quantile") is not None else ""))
        return f"layer {config['layer']} steered, alpha {config['alpha']:g}, {gate}"

    @classmethod
    def short_name(cls, config: dict) -> str:
        if config["layer"] is None:
            return "fairsteer off"
        return f"fairsteer layer {config['layer']}, alpha {config['alpha']:g}" + (", always" if config["threshold"] is None else "")

    @classmethod
    def merge_setting(cls, saved: dict, setting: dict, n_layers: int) -> dict:
        setting = dict(setting)
        if "layers" in setting:
            layers = setting.pop("layers")
            if len(layers) != 1:
                raise UserError(f"--layers {','.join(map(str, layers))}: FairSteer steers one layer; give one index")
            setting["layer"] = layers[0]
        merged = {**saved, **setting}
        SteerSetting(**merged).check(n_layers)
        return merged

    @classmethod
    def reattach(cls, model, tensors: dict, meta: dict, folder=None) -> Steerer:
        """Re-attach exported steering (repair.load); ValueError when it does not fit the model."""
        return Steerer(model, Steering.from_tensors(tensors), [SteerSetting(**meta["setting"])])

    @classmethod
    def probe_scores(cls, run_dir: Path) -> list[dict] | None:
        """The probes' held-out scores: one row of the heat map."""
        path = run_dir / "fairsteer" / "steering.json"
        if not path.is_file():
            return None
        return [{**s, "kind": "fairsteer", "attribute": "biased vs unbiased"} for s in json.loads(path.read_text())["scores"]]

    def min_budget(self) -> int:
        """The layer sweep (at least MIN_SAMPLES seed configurations) and the rounds."""
        return max(MIN_SAMPLES, self.space.n_layers) + self.config.rounds * self.config.per_round

    # ---- what the method fits before searching --------------------------------------------------
    def probe_sites(self, model) -> dict:
        """The residual stream, for the association labelling (the published BBQ one reads BBQ items)."""
        return {"residual": residual_modules(model)} if self.options.steer_labels == "association" else {}

    def prepare(self, loaded, config, search, probes) -> None:
        """Probes and vectors on the search split, kept in RUN_DIR/fairsteer/ (a rerun reuses them)."""
        self.steering, self.scores = steering.prepare(loaded, search, config.out / "fairsteer",
                                                      self.options.steer_labels,
                                                      source=probes.site("residual") if "residual" in probes.sites else None)
        self.space = replace(self.space, gates=self.steering.gate_table())
        best = sorted(self.scores, key=lambda s: -s["macro_f1"])[:3]
        print("FairSteer probes (held-out macro-F1, majority label %.3f): " % best[0]["majority_f1"]
              + ", ".join(f"layer {s['layer']} {s['macro_f1']:.3f}" for s in best), file=sys.stderr)

    def artifacts(self) -> dict:
        return {ARTIFACT: artifacts.pack(self.steering.to_bytes())}

    def load_artifacts(self, attrs: dict) -> None:
        self.steering = Steering.from_bytes(artifacts.unpack(attrs, ARTIFACT, "FairSteer vectors"))
        self.space = replace(self.space, gates=self.steering.gate_table())

    def intervention(self, model) -> Steerer:
        try:
            return Steerer(model, self.steering, [SteerSetting()])
        except ValueError as exc:
            raise UserError(f"the FairSteer vectors do not fit this model: {exc}") from None

    # ---- what it evaluates ----------------------------------------------------------------------
    def sweep_keys(self) -> list[str]:
        """The published way to pick the layer: every layer at one setting."""
        out = []
        for layer in range(self.space.n_layers):
            bits = np.ones(self.space.n_bits, bool)
            bits[layer] = False
            out.append(self.space.key(bits, SWEEP_SETTING))
        return out

    def seed(self, search) -> list[tuple[str, str]]:
        """The unrepaired model, the layer sweep, then configurations drawn uniformly from the rest of
        the grid, in all the budget left for rounds."""
        cfg = self.config
        sweep = self.sweep_keys()
        n_sample = max(0, cfg.budget_evals - cfg.rounds * cfg.per_round - len(sweep))
        rest = [k for k in self.space.enumerate() if k not in set(sweep)]
        drawn = np.random.default_rng(cfg.seed).choice(len(rest), min(n_sample, len(rest)), replace=False)
        return [(BASE, "base")] + [(k, "layer-sweep") for k in sweep] + [(rest[i], "sample") for i in drawn]

    def every_configuration(self) -> list[str]:
        return self.space.enumerate()  # 900 on a 30-layer model: scored whole

    def surrogate_params(self, search) -> tuple[dict, dict]:
        return {}, {}

    def baselines(self, search) -> dict[str, list[str]]:
        """The layer sweep and the always-on configurations the search itself evaluated (no new
        evaluations), and, with --baselines random, random search at the same budget."""
        done = search.records.completed()
        out = {"layer-sweep": [BASE, *self.sweep_keys()],
               "always-on": [BASE] + sorted(k for k, t in done.items() if k != BASE and t.user_attrs["phase"] != "random"
                                           and self.space.config(k).threshold is None)}
        if "random" in self.config.baselines:
            everything = self.space.enumerate()
            drawn = np.random.default_rng(self.config.seed + 7919).choice(
                len(everything), min(self.config.budget_evals, len(everything)), replace=False)
            out["random"] = search.evaluate([(BASE, "base")] + [(everything[i], "random") for i in drawn],
                                            "baseline: random configurations")
        return out

    # ---- applying and exporting a configuration -------------------------------------------------
    def attach(self, model, key: str) -> Steerer:
        """The configuration on `model` in memory, removable."""
        return Steerer(model, self.steering, [self.space.config(key)])

    def bundle(self, key: str) -> tuple[dict, dict, dict | None]:
        """What a hooked checkpoint of `key` stores: tensors, settings, models beside the weights."""
        s = self.space.config(key)
        return self.steering.tensors(), {"setting": {"layer": s.layer, "alpha": s.alpha, "threshold": s.threshold}}, None

    def extra_tensors(self, key: str) -> list:
        return list(self.bundle(key)[0].values())

    def export(self, loaded, key: str, target, manifest: dict, card: str):
        from repair.export import export_hooked

        tensors, meta, _ = self.bundle(key)
        return export_hooked(loaded, self.name, tensors, meta, target, manifest, card)
