"""FairMed: probers read social-group associations off MLP outputs; a neutralizer moves the
activations of selected layers towards the target distribution at inference. The layers (any
subset, not only the paper's top-k), lambda, steps and the gate are searched.

The paper's rule, the k layers whose probers score best for k = 1..TOPK, is always evaluated (at a few
settings) and kept as its own sequence, `top-k`, verified and reported like the search, so the report
shows whether searched subsets beat it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from repair.errors import UserError
from repair.methods import artifacts
from repair.methods.base import Method
from repair.methods.fairmed.cache import SCORES, probe
from repair.methods.fairmed.neutralizer import Neutralizer, NeutralizerSetting
from repair.methods.fairmed.probers import GATE_QUANTILES, Probers, mlp_modules
from repair.methods.fairmed.space import LayerSubsetSpace
from repair.space import BASE, MIN_SAMPLES

TOPK = 6
# The top-k rule's settings: the paper's (lambda 0.1, 3 steps, every position) and gated ones.
TOPK_SETTINGS = ((0.1, 3, 0.0), (0.2, 3, 0.75), (0.4, 3, 0.75))
ANNEAL_SETTINGS = 6  # settings annealed per round: those of the fairest evaluated configurations
ARTIFACT = "fairmed/probers"


class FairMed(Method):
    name = "fairmed"
    seed_phases = ("topk", "sample")
    seed_description = "sampling layer subsets"
    anneal_size = (48, 600)  # chains, steps per setting and weight: 30 bits need far fewer than 270
    budget_share = 0.3
    explanation = ("Probers read social-group associations off those layers' MLP outputs; at inference the "
                   "neutralizer moves the outputs towards the target distribution.")
    setting_flags = ("layers", "lam", "steps", "gate")

    def __init__(self, config, model):
        self.config, self.options = config, self.options_of(config)
        n_layers = len(mlp_modules(model))  # refuses a model without recognisable MLP blocks, naming its class
        self.space = LayerSubsetSpace(n_layers, min(self.options.max_layers, n_layers), self.options.target)
        self.probers: Probers | None = None
        self.scores: list[dict] = []

    @classmethod
    def check_config(cls, config, names) -> None:
        options = cls.options_of(config)
        if config.baselines and names[0] == "fairmed":
            raise UserError("--baselines random,knockout are baselines of --method prune (and random of fairsteer); "
                            "fairmed has its own (it always evaluates the top-k rule)")
        if options.max_layers < 1:
            raise UserError(f"--max-layers must be at least 1, got {options.max_layers}")
        if options.target not in ("neutral", "uniform"):
            raise UserError(f"--target must be neutral or uniform, got {options.target!r}")

    @classmethod
    def describe(cls, config: dict) -> str:
        if not config["layers"]:
            return "no layer treated"
        return (f"layers {', '.join(map(str, config['layers']))}; lambda {config['lambda']:g}, {config['steps']} steps, "
                f"gate {config['gate']:g}, target {config['target']}")

    @classmethod
    def short_name(cls, config: dict) -> str:
        if not config["layers"]:
            return "fairmed off"
        return f"fairmed layers {layer_ranges(config['layers'])}, lambda {config['lambda']:g}"

    @classmethod
    def merge_setting(cls, saved: dict, setting: dict, n_layers: int) -> dict:
        if "gate" in setting and setting["gate"] not in GATE_QUANTILES:
            raise UserError(f"--gate must be one of {', '.join(f'{g:g}' for g in GATE_QUANTILES)} (a quantile of the "
                             f"probers' KL), got {setting['gate']:g}")
        merged = {**saved, **setting}
        NeutralizerSetting(**{**merged, "layers": tuple(merged["layers"])}).check(n_layers)
        return merged

    @classmethod
    def reattach(cls, model, tensors: dict, meta: dict, folder=None) -> Neutralizer:
        """Re-attach an exported neutralizer (repair.load); ValueError when it does not fit the model."""
        probers = Probers.from_tensors(tensors, meta["probers"])
        return Neutralizer(model, probers, [NeutralizerSetting(**{**meta["setting"], "layers": tuple(meta["setting"]["layers"])})])

    @classmethod
    def probe_scores(cls, run_dir: Path) -> list[dict] | None:
        """The probers' held-out scores: the layer x attribute heat map."""
        path = run_dir / "fairmed" / SCORES
        return json.loads(path.read_text())["scores"] if path.is_file() else None

    def min_budget(self) -> int:
        """Seed configurations the surrogates can learn from (the top-k rule's among them), and the rounds."""
        return MIN_SAMPLES + self.config.rounds * self.config.per_round

    # ---- what the method fits before searching --------------------------------------------------
    def probe_sites(self, model) -> dict:
        return {"mlp": mlp_modules(model)}

    def prepare(self, loaded, config, search, probes) -> None:
        """Probers on the search split's probe pass, cached in RUN_DIR/fairmed/ (a rerun reuses them)."""
        self.probers, self.scores = probe(loaded, search, config.out / "fairmed", seed=config.seed,
                                          source=probes.site("mlp"))

    def artifacts(self) -> dict:
        """The probers, for workers (they evaluate with the coordinator's, not ones of their own)."""
        return {ARTIFACT: artifacts.pack(_probers_bytes(self.probers))}

    def load_artifacts(self, attrs: dict) -> None:
        data = artifacts.unpack(attrs, ARTIFACT, "FairMed probers")
        from safetensors.torch import load

        self.probers = Probers.from_tensors(load(data), _meta_from(data))

    def intervention(self, model) -> Neutralizer:
        try:
            return Neutralizer(model, self.probers, [self.space.config(BASE)])
        except ValueError as exc:
            raise UserError(f"the FairMed probers do not fit this model: {exc}") from None

    # ---- what it evaluates ----------------------------------------------------------------------
    def ranking(self) -> list[int]:
        """Layers, best first, by their probers' held-out score: macro-F1 above the majority baseline,
        averaged over attributes (the paper ranks by prober accuracy); ties by the KL they explain."""
        by_layer: dict[int, list] = {}
        for s in self.scores:
            by_layer.setdefault(s["layer"], []).append((s["macro_f1"] - s["majority_f1"], s["kl_mean"] - s["kl"]))
        score = {l: tuple(np.mean(v, axis=0)) for l, v in by_layer.items()}
        return sorted(score, key=lambda l: (-score[l][0], -score[l][1], l))

    def topk_keys(self) -> list[str]:
        order, space = self.ranking(), self.space
        out = []
        for setting in TOPK_SETTINGS:
            for k in range(1, min(TOPK, space.max_changed) + 1):
                bits = np.ones(space.n_bits, bool)
                bits[order[:k]] = False
                out.append(space.key(bits, setting))
        return out

    def seed(self, search) -> list[tuple[str, str]]:
        """The unrepaired model, the top-k rule, then random layer subsets (sizes spread over 1..max)
        with random settings, in all the budget left for rounds."""
        cfg, space = self.config, self.space
        topk = self.topk_keys()
        n_sample = cfg.budget_evals - cfg.rounds * cfg.per_round - len(topk)
        rng = np.random.default_rng(cfg.seed)
        settings = space.settings
        items, seen = [(BASE, "base")] + [(k, "topk") for k in topk], {BASE, *topk}
        while len(items) < 1 + len(topk) + n_sample:
            size = int(rng.integers(1, space.max_changed + 1))
            bits = np.ones(space.n_bits, bool)
            bits[rng.choice(space.n_bits, size, replace=False)] = False
            key = space.key(bits, settings[int(rng.integers(len(settings)))])
            if key not in seen:
                seen.add(key)
                items.append((key, "sample"))
        return items

    def surrogate_params(self, search) -> tuple[dict, dict]:
        return {}, {}

    def anneal_settings(self, search, keys: list[str], fairness) -> list:
        """The settings of the fairest evaluated configurations within the utility limit (all of them
        when fewer qualify), at most ANNEAL_SETTINGS."""
        limit = search.utility_limit_loss()
        done = search.records.completed()
        ok = [k for k in keys if k != BASE and done[k].values[1] <= limit] or [k for k in keys if k != BASE]
        out = []
        for k in sorted(ok, key=lambda k: (done[k].values[0], k)):
            s = self.space.setting(k)
            if s not in out:
                out.append(s)
            if len(out) == ANNEAL_SETTINGS:
                break
        return out

    def baselines(self, search) -> dict[str, list[str]]:
        """The top-k rule as its own sequence (already evaluated: it is part of the seed)."""
        return {"top-k": search.evaluate([(BASE, "base")] + [(k, "topk") for k in self.topk_keys()], "top-k rule")}

    # ---- applying and exporting a configuration -------------------------------------------------
    def attach(self, model, key: str) -> Neutralizer:
        """The configuration on `model` in memory, removable."""
        return Neutralizer(model, self.probers, [self.space.config(key)])

    def bundle(self, key: str) -> tuple[dict, dict, dict | None]:
        """What a hooked checkpoint of `key` stores: tensors, settings, models beside the weights."""
        setting = self.space.config(key)
        return self.probers.tensors(), {"probers": self.probers.metadata(), "setting": _setting_dict(setting)}, None

    def extra_tensors(self, key: str) -> list:
        return list(self.bundle(key)[0].values())

    def export(self, loaded, key: str, target, manifest: dict, card: str):
        from repair.export import export_hooked

        tensors, meta, _ = self.bundle(key)
        return export_hooked(loaded, "fairmed", tensors, meta, target, manifest, card)


def layer_ranges(layers) -> str:
    """'22, 25-29' for [22, 25, 26, 27, 28, 29]."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _setting_dict(s: NeutralizerSetting) -> dict:
    return {"layers": list(s.layers), "lam": s.lam, "steps": s.steps, "gate": s.gate, "target": s.target}


def _probers_bytes(probers: Probers) -> bytes:
    import json

    from safetensors.torch import save

    return save(probers.tensors(), metadata={"probers": json.dumps(probers.metadata())})


def _meta_from(data: bytes) -> dict:
    """The metadata header of a safetensors byte string."""
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return json.loads(header["__metadata__"]["probers"])

