"""The method contract holds: a fifth method, defined in this file alone and registered here, runs end
to end through the shared pipeline with no product file changed for it. It scales one decoder layer's
output (the residual stream after it) by a factor: `--method scale` alone, then `--method all` with
stacks, its export and `repair.load`, `repair evaluate --compare` on its checkpoint, and a worker
rescoring its keys. Its effect is checked against a second implementation that patches the decoder
layer's forward instead of hooking it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import SMALL, rescore_as_a_worker, stored
from repair import arch
from repair.methods import METHODS
from repair.methods.base import Method, flag
from repair.methods.rows import PerRowHooks
from repair.space import BASE, STACK, method_of

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 7, 100, 3]])
QUICK = ["--no-progress", "--limit", "2", "--ppl-tokens", "128"]


# ---- the method: everything it is, in this file ---------------------------------------------------
@dataclass(frozen=True)
class ScaleOptions:
    scale_factors: str = flag("0.5,1.5", str, "the factors a layer's output may be scaled by, comma-separated")


@dataclass(frozen=True)
class ScaleSetting:
    layer: int | None = None  # None: nothing scaled
    factor: float = 1.0


class LayerScale(PerRowHooks):
    """Multiplies the output of one decoder layer by a factor, each batch row by its own setting."""

    def __init__(self, model, settings=(ScaleSetting(),)):
        self.layers = arch.decoder_layers(model)
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        self.set_variants(settings)

    def set_variants(self, settings) -> None:
        for s in settings:
            if s.layer is not None and not 0 <= s.layer < len(self.layers):
                raise ValueError(f"layer {s.layer} is out of range (the model has layers 0..{len(self.layers) - 1})")
        self.settings, self._rows = list(settings), None

    def _hook(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            rows = self._row_ids(hidden.shape[0])
            factor = torch.tensor([s.factor if s.layer == index else 1.0 for s in self.settings], dtype=hidden.dtype)
            scaled = hidden * factor.to(hidden.device)[rows.to(hidden.device)][:, None, None]
            return (scaled, *output[1:]) if isinstance(output, tuple) else scaled
        return hook

    def describe(self) -> str:
        return "; ".join(f"layer {s.layer} x {s.factor:g}" for s in self.settings)


@dataclass(frozen=True)
class ScaleSpace:
    """One layer and one factor, or nothing: small enough to evaluate whole."""

    n_layers: int
    factors: tuple[float, ...]
    method: str = "scale"
    n_bits = 0
    max_changed = 0

    @property
    def settings(self):
        return tuple((layer, f) for layer in range(self.n_layers) for f in self.factors)

    def key(self, bits, setting) -> str:
        return f"{self.method}:layer={setting[0]}/factor={setting[1]:g}"

    def config(self, key: str) -> ScaleSetting:
        if key == BASE:
            return ScaleSetting()
        layer, factor = (part.partition("=")[2] for part in key.partition(":")[2].split("/"))
        return ScaleSetting(int(layer), float(factor))

    def setting(self, key: str):
        s = self.config(key)
        return (s.layer, s.factor)

    def setting_features(self, setting) -> np.ndarray:
        layer, factor = setting
        return np.array([-1.0 if layer is None else layer / self.n_layers, factor])

    def features(self, key: str) -> np.ndarray:
        return self.setting_features(self.setting(key))

    def enumerate(self) -> list[str]:
        return [self.key(None, s) for s in self.settings]

    def describe(self, key: str) -> dict:
        s = self.config(key)
        return {"layer": s.layer, "factor": s.factor}


class Scale(Method):
    name = "scale"
    seed_phases = ("grid",)
    seed_description = "every layer and factor"
    setting_flags = ("layers",)
    explanation = "The layer's output is multiplied by the factor at every position."

    def __init__(self, config, model):
        self.config, self.options = config, self.options_of(config)
        factors = tuple(float(f) for f in self.options.scale_factors.split(","))
        self.space = ScaleSpace(len(arch.decoder_layers(model)), factors)

    @classmethod
    def check_config(cls, config, names) -> None:
        from repair.errors import UserError

        try:
            factors = [float(f) for f in cls.options_of(config).scale_factors.split(",")]
        except ValueError:
            factors = []
        if not factors or not all(f > 0 for f in factors):
            raise UserError(f"--scale-factors {cls.options_of(config).scale_factors}: give positive numbers, as in 0.5,1.5")

    @classmethod
    def describe(cls, config: dict) -> str:
        return "nothing scaled" if config["layer"] is None else f"layer {config['layer']} x {config['factor']:g}"

    @classmethod
    def merge_setting(cls, saved: dict, setting: dict, n_layers: int) -> dict:
        merged = {**saved, **({"layer": setting["layers"][0]} if "layers" in setting else {})}
        if not 0 <= merged["layer"] < n_layers:
            raise ValueError(f"layer {merged['layer']} is out of range (the model has layers 0..{n_layers - 1})")
        return merged

    @classmethod
    def reattach(cls, model, tensors: dict, meta: dict, folder=None) -> LayerScale:
        return LayerScale(model, [ScaleSetting(**meta["setting"])])

    def min_budget(self) -> int:
        return len(self.space.enumerate())

    def every_configuration(self) -> list[str]:
        return self.space.enumerate()

    def intervention(self, model) -> LayerScale:
        return LayerScale(model)

    def seed(self, search):
        return [(BASE, "base")] + [(k, "grid") for k in self.space.enumerate()]

    def surrogate_params(self, search):
        return {}, {}

    def attach(self, model, key: str) -> LayerScale:
        return LayerScale(model, [self.space.config(key)])

    def bundle(self, key: str):
        s = self.space.config(key)
        return {}, {"setting": {"layer": s.layer, "factor": s.factor}}, None

    def extra_tensors(self, key: str) -> list:
        return []

    def export(self, loaded, key: str, target, manifest: dict, card: str):
        from repair.export import export_hooked

        tensors, meta, _ = self.bundle(key)
        return export_hooked(loaded, self.name, tensors, meta, target, manifest, card)


@pytest.fixture(scope="module", autouse=True)
def registered():
    METHODS.register("scale", Scale, ScaleOptions)
    yield
    METHODS.unregister("scale")


# ---- a second implementation: the decoder layer's forward patched, no hooks ------------------------
def scaled_by_hand(monkeypatch, layer: int, factor: float) -> None:
    """Every LlamaDecoderLayer with `layer_idx == layer` returns its output times `factor`."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    forward = LlamaDecoderLayer.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.self_attn.layer_idx != layer:
            return out
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor

    monkeypatch.setattr(LlamaDecoderLayer, "forward", patched)


def _run(model_dir, out, *flags):
    from repair.cli import main

    assert main(["run", "--model", str(model_dir), "--out", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def scale_run(model_dir, tmp_path_factory):
    return _run(model_dir, tmp_path_factory.mktemp("scale") / "run", *SMALL, "--method", "scale", "--scale-factors", "0.5,2")


def test_the_fifth_method_runs_alone_with_its_own_flag(scale_run):
    trials = stored(f"sqlite:///{scale_run / 'study.db'}", f"repair-{scale_run.name}")
    assert set(trials) == {BASE} | {f"scale:layer={l}/factor={f}" for l in range(3) for f in ("0.5", "2")}
    identity = json.loads((scale_run / "config.json").read_text())["identity"]
    assert identity["scale_factors"] == "0.5,2"  # its option is part of what a resume must match
    manifest = json.loads((scale_run / "checkpoint" / "repair_manifest.json").read_text())
    chosen = next(json.loads(line) for line in (scale_run / "candidates.jsonl").read_text().splitlines()
                  if json.loads(line)["chosen"])
    assert manifest["key"] == chosen["key"]
    if chosen["key"] != BASE:
        card = (scale_run / "checkpoint" / "README.md").read_text()
        assert f"layer {chosen['config']['layer']} x {chosen['config']['factor']:g}" in card
        assert "multiplied by the factor" in card


def test_its_checkpoint_loads_repaired_and_equals_the_hand_patched_model(scale_run, model_dir, tmp_path, monkeypatch):
    """Exported with the pipeline's export (here forced to a scaling configuration), reloaded by
    repair.load: its logits equal the base model with the layer's forward patched by hand."""
    import repair
    from repair.export import export_hooked
    from repair.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(model_dir)))
    meta = {"setting": {"layer": 1, "factor": 2.0}}
    target = export_hooked(loaded, "scale", {}, meta, tmp_path / "checkpoint",
                           {"method": "scale", "key": "scale:layer=1/factor=2", "layer": 1, "factor": 2.0}, "card\n")
    model, _ = repair.load(target)
    with torch.inference_mode():
        repaired = model(IDS).logits
        model.repair_interventions[0].remove()
        base = model(IDS).logits
    reference = load_model(ModelSpec(str(model_dir))).model
    scaled_by_hand(monkeypatch, 1, 2.0)
    with torch.inference_mode():
        by_hand = reference(IDS).logits
    assert torch.allclose(repaired, by_hand, atol=1e-5) and not torch.allclose(repaired, base, atol=1e-3)


def test_evaluate_compare_scores_its_checkpoint_as_the_hand_patched_model(scale_run, model_dir, tmp_path, monkeypatch):
    from repair.cli import main
    from repair.export import export_hooked
    from repair.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(model_dir)))
    target = export_hooked(loaded, "scale", {}, {"setting": {"layer": 0, "factor": 0.5}}, tmp_path / "checkpoint",
                           {"method": "scale", "key": "scale:layer=0/factor=0.5", "layer": 0, "factor": 0.5}, "card\n")
    assert main(["evaluate", "--model", str(target), "--compare", str(model_dir), *QUICK, "--json", str(tmp_path / "c.json")]) == 0
    scaled_by_hand(monkeypatch, 0, 0.5)
    assert main(["evaluate", "--model", str(model_dir), *QUICK, "--json", str(tmp_path / "hand.json")]) == 0
    compared, hand = (json.loads((tmp_path / n).read_text()) for n in ("c.json", "hand.json"))
    for key in ("association/overall/kl_neutral", "text/overall/perplexity"):
        suite, metric = key.split("/", 1)
        change = compared["compare"]["changes"][key]
        assert change["after"] == pytest.approx(hand["suites"][suite]["metrics"][metric]["value"], rel=1e-6)
        assert change["after"] != pytest.approx(change["before"], rel=1e-6)


def test_a_setting_flag_reaches_its_merge_and_a_foreign_one_is_refused(scale_run, model_dir, tmp_path, capsys):
    from repair.cli import main
    from repair.export import export_hooked
    from repair.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(model_dir)))
    target = export_hooked(loaded, "scale", {}, {"setting": {"layer": 0, "factor": 0.5}}, tmp_path / "checkpoint",
                           {"method": "scale", "key": "scale:layer=0/factor=0.5", "layer": 0, "factor": 0.5}, "card\n")
    assert main(["generate", "--model", str(target), "--prompt", "The", "--max-new-tokens", "2", "--layers", "7"]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err
    assert main(["generate", "--model", str(target), "--prompt", "The", "--max-new-tokens", "2", "--lam", "0.1"]) == 2
    assert "--lam does not apply to a scale checkpoint (its setting takes --layers)" in capsys.readouterr().err


def test_a_bad_value_of_its_flag_is_refused_in_one_line(model_dir, tmp_path, capsys):
    from repair.cli import main

    assert main(["run", "--model", str(model_dir), "--out", str(tmp_path / "r"), "--method", "scale",
                 "--scale-factors", "0,x"]) == 2
    assert capsys.readouterr().err.strip() == "repair: error: --scale-factors 0,x: give positive numbers, as in 0.5,1.5"
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def all_run(model_dir, tmp_path_factory):
    flags = list(SMALL)
    flags[flags.index("--budget-evals") + 1] = "125"
    flags[flags.index("--rounds") + 1] = "0"
    return _run(model_dir, tmp_path_factory.mktemp("all5") / "run", *flags, "--method", "all",
                "--budget-shares", "prune=1,fairmed=1,fairsteer=1,experts=1,scale=1")


def test_in_method_all_it_searches_stacks_and_a_worker_rescores_it(all_run):
    trials = stored(f"sqlite:///{all_run / 'study.db'}", f"repair-{all_run.name}")
    assert {method_of(k) for k in trials} >= {None, "prune", "fairmed", "fairsteer", "experts", "scale", STACK}
    candidates = [json.loads(line) for line in (all_run / "candidates.jsonl").read_text().splitlines()]
    best = next(c for c in candidates if "scale" in c["best_of"])
    assert best["method"] in ("scale", BASE)
    stacks = [c for c in candidates if c["method"] == STACK]
    if best["key"] != BASE:  # its best is a repair: it was stacked with every other method's repaired best
        assert any(best["key"] in c["key"] for c in stacks)
    trials, rows = rescore_as_a_worker(all_run, "scale", n=3)
    assert len(rows) == 3
    for t, row in zip(trials, rows):
        assert row["fairness"] == pytest.approx(t.values[0], abs=1e-9), t.user_attrs["key"]
    report = (all_run / "report" / "index.html").read_text()
    assert "scale" in report
