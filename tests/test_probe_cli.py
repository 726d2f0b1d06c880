"""`repair probe`: the files it writes, the cache a rerun reuses (activations never recomputed, probers
read back and checked), the per-layer table and the heat map against numbers worked out by hand, and
the report section the heat map goes into."""
from __future__ import annotations

import argparse
import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import replace

import numpy as np
import pytest
import torch

from repair.cli import add_probe_parser
from repair.errors import UserError
from repair.io import sha256_file
from repair.methods.fairmed.cache import format_scores, load_data_file, probe, save_data
from repair.models import ModelSpec, load_model
from repair.suites.association import load_data
from repair.suites.base import EvalConfig
import repair.methods.fairmed.probers
from reports import build_report, write_report
from reports.heatmap import probe_heatmap, standalone

ONE = EvalConfig(split="search", attributes=("religion",))  # one attribute keeps the tiny model's probe quick
QUICK = dict(dims=8, l2_grid=(0.1, 1.0), folds=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(ModelSpec(str(model_dir), device="cpu"))


@pytest.fixture(scope="module")
def probed(loaded, tmp_path_factory):
    """One probe of the tiny model into a folder: (folder, probers, scores)."""
    folder = tmp_path_factory.mktemp("probe") / "out"
    probers, scores = probe(loaded, ONE, folder, progress=False, fit_settings=QUICK)
    return folder, probers, scores


def copy_of(probed, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(probed[0], folder)
    return folder


def no_collect(*args, **kwargs):
    raise AssertionError("activations were recomputed")


def test_probe_writes_the_files_with_their_hashes_and_settings(probed, loaded):
    folder, probers, scores = probed
    assert sorted(p.name for p in folder.iterdir()) == ["activations.npz", "probe-scores.json", "probers.safetensors"]
    record = json.loads((folder / "probe-scores.json").read_text())
    assert record["activations_sha256"] == sha256_file(folder / "activations.npz")
    assert record["probers_sha256"] == sha256_file(folder / "probers.safetensors")
    assert record["data_sha256"] == load_data()[1]
    assert record["settings"] == {"dims": 8, "l2_grid": [0.1, 1.0], "folds": 2, "seed": 0}
    assert record["scores"] == scores
    n_layers = loaded.model.config.num_hidden_layers
    assert [(s["layer"], s["attribute"]) for s in scores] == [(l, "religion") for l in range(n_layers)]
    assert probers.attributes == ("religion",) and probers.n_layers == n_layers
    with np.load(folder / "activations.npz") as z:
        assert z["activations"].shape[1:] == (n_layers, loaded.model.config.hidden_size)
        assert z["neutral"].any() and not z["neutral"].all()
        assert set(z["attributes"]) == {"religion"}


def test_rerun_reuses_activations_and_probers(probed, tmp_path, monkeypatch):
    folder = copy_of(probed, tmp_path)
    monkeypatch.setattr(repair.methods.fairmed.probers, "collect", no_collect)
    monkeypatch.setattr(repair.methods.fairmed.probers, "probe_data", no_collect)
    monkeypatch.setattr(repair.methods.fairmed.probers, "fit", no_collect)  # same settings: not even refitted
    probers, scores = probe(_loaded_stub(probed), ONE, folder, progress=False, fit_settings=QUICK)
    assert scores == probed[2]
    assert torch.equal(probers.A, probed[1].A) and torch.equal(probers.gate_kl, probed[1].gate_kl)


def _loaded_stub(probed):
    """The model is only asked to describe itself when its activations are cached."""
    return _Described(json.loads((probed[0] / "probe-scores.json").read_text())["data"]["model"])


class _Described:
    def __init__(self, description):
        self.description = description

    def describe(self):
        return {**self.description, "device": "elsewhere", "spec": "another name for it"}


def test_new_settings_refit_from_the_cached_activations(probed, tmp_path, monkeypatch):
    folder = copy_of(probed, tmp_path)
    before = sha256_file(folder / "activations.npz")
    monkeypatch.setattr(repair.methods.fairmed.probers, "collect", no_collect)
    _, scores = probe(_loaded_stub(probed), ONE, folder, progress=False, fit_settings={**QUICK, "l2_grid": (10.0,)})
    assert {s["l2"] for s in scores} == {10.0}
    record = json.loads((folder / "probe-scores.json").read_text())
    assert record["settings"]["l2_grid"] == [10.0] and record["activations_sha256"] == before
    assert record["probers_sha256"] == sha256_file(folder / "probers.safetensors")


def test_tampered_probers_are_refused(probed, tmp_path):
    folder = copy_of(probed, tmp_path)
    other = replace(probed[1], c=probed[1].c + 1)
    other.save(folder / "probers.safetensors")
    with pytest.raises(UserError) as e:
        probe(_loaded_stub(probed), ONE, folder, progress=False, fit_settings=QUICK)
    message = str(e.value)
    assert "probers.safetensors" in message and "delete it to recompute" in message and "\n" not in message


def test_changed_activations_are_refused(probed, tmp_path):
    folder = copy_of(probed, tmp_path)
    path = folder / "activations.npz"
    data = load_data_file(path)
    record = json.loads((folder / "probe-scores.json").read_text())
    save_data(path, replace(data, activations=data.activations + 1), record["data"])
    with pytest.raises(UserError, match="activations.npz changed since the probers .* delete it to recompute"):
        probe(_loaded_stub(probed), ONE, folder, progress=False, fit_settings=QUICK)


def test_activations_of_another_model_or_suite_are_refused(probed, tmp_path):
    folder = copy_of(probed, tmp_path)
    stub = _loaded_stub(probed)
    with pytest.raises(UserError, match="another attributes"):
        probe(stub, EvalConfig(split="search", attributes=("gender",)), folder, progress=False, fit_settings=QUICK)
    stub.description = {**stub.description, "n_parameters": 1}
    with pytest.raises(UserError, match="activations.npz holds activations of another model"):
        probe(stub, ONE, folder, progress=False, fit_settings=QUICK)


def test_cli_writes_scores_probers_and_heat_map(model_dir, tmp_path, monkeypatch, capsys):
    # The command probes every attribute; one keeps the tiny model quick, and the fit is the default one.
    real = repair.methods.fairmed.probers.probe_data
    monkeypatch.setattr(repair.methods.fairmed.probers, "probe_data",
                        lambda loaded, config, progress=True: real(loaded, replace(config, attributes=("religion",)), progress))
    parser = argparse.ArgumentParser(prog="repair")
    add_probe_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "probe"
    args = parser.parse_args(["probe", "--model", str(model_dir), "--device", "cpu", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "best layers by gain:" in printed and f"wrote {out / 'probe-scores.json'}" in printed
    assert {"probe-scores.json", "probers.safetensors", "heatmap.svg", "activations.npz"} <= {p.name for p in out.iterdir()}
    root = ET.parse(out / "heatmap.svg").getroot()  # a well-formed standalone SVG
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len([r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "cell"]) == 3
    record = json.loads((out / "probe-scores.json").read_text())
    assert record["settings"] == {"dims": 64, "l2_grid": [1e-3, 1e-2, 1e-1, 1.0, 10.0], "folds": 5, "seed": 0}

    bad = parser.parse_args(["probe", "--model", str(model_dir), "--out", str(out), "--seed", "-1"])
    with pytest.raises(UserError, match="--seed must be 0 or more"):
        bad.func(bad)


# ---- the table and the heat map, on hand-made scores ----------------------------------------------

def score(layer, attribute, macro, majority, kl, kl_mean):
    return {"layer": layer, "attribute": attribute, "macro_f1": macro, "majority_f1": majority, "kl": kl,
            "kl_mean": kl_mean, "l2": 0.1, "n_prompts": 40, "n_concepts": 10}


HAND = [
    score(0, "gender", 0.40, 0.30, 0.20, 0.25), score(0, "religion", 0.20, 0.25, 0.50, 0.40),
    score(0, "age", 0.30, 0.30, 0.30, 0.30),
    score(1, "gender", 0.60, 0.30, 0.10, 0.25), score(1, "religion", 0.35, 0.25, 0.30, 0.40),
    score(1, "age", 0.50, 0.30, 0.20, 0.30),
    score(2, "gender", 0.25, 0.30, 0.30, 0.25), score(2, "religion", 0.30, 0.25, 0.45, 0.40),
    score(2, "age", 0.20, 0.30, 0.40, 0.30),
]


def test_format_scores_gives_the_means_per_layer_and_the_best_layers():
    text = format_scores(HAND)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:1].isdigit()}
    # layer 1: macro (0.60 + 0.35 + 0.50) / 3 = 0.48333; majority 0.28333; gain 0.2; KL 0.2; KL(mean) 0.31667; 3 beat
    assert rows["1"] == ["1", "0.483", "0.283", "+0.200", "0.2000", "0.3167", "3/3"]
    # layer 0: gain (0.10 - 0.05 + 0) / 3 = 0.01667; only gender beats (age ties); KL (0.2 + 0.5 + 0.3) / 3
    assert rows["0"] == ["0", "0.300", "0.283", "+0.017", "0.3333", "0.3167", "1/3"]
    # layer 2: gain (-0.05 + 0.05 - 0.10) / 3 = -0.03333
    assert rows["2"] == ["2", "0.250", "0.283", "-0.033", "0.3833", "0.3167", "1/3"]
    assert text.splitlines()[-1] == "best layers by gain: 1, 0, 2"


def test_heat_map_has_one_cell_per_layer_and_attribute_with_its_value():
    root = ET.fromstring(probe_heatmap(HAND))
    cells = [r for r in root.iter("rect") if r.get("class") == "cell"]
    assert len(cells) == 9
    expected = {(s["layer"], s["attribute"]): s["macro_f1"] - s["majority_f1"] for s in HAND}
    seen = set()
    for rect in cells:
        key = (int(rect.get("data-layer")), rect.get("data-attribute"))
        seen.add(key)
        title = rect.find("title").text
        assert title.startswith(f"layer {key[0]}, {key[1]}: macro-F1 - majority-F1 = {expected[key]:+.3f}\n")
        r, g, b = (int(rect.get("fill")[i:i + 2], 16) for i in (1, 3, 5))
        if expected[key] > 1e-9:
            assert b > r  # blue: beats the majority baseline
        elif expected[key] < -1e-9:
            assert r > b
        else:
            assert r == g == b  # the white middle
    assert seen == set(expected)
    texts = [t.text for t in root.iter("text")]
    assert "attribute" in texts and any(t.startswith("layer") for t in texts) and "F1 gain" in texts
    assert "religion" in texts and "2" in texts  # row and column labels
    assert ET.fromstring(standalone(probe_heatmap(HAND)).split("\n", 1)[1]).tag == "{http://www.w3.org/2000/svg}svg"


POINTS = [{"name": n, "method": m, "kind": k, "fairness": f, "utility": u, "fairness_ci": None, "utility_ci": None,
           "split": "report", "config": {}} for n, m, k, f, u in
          (("base", "base", "base", 0.4, 20.0), ("chosen", "prune", "chosen", 0.3, 21.0))]
OBJECTIVES = {"fairness": {"name": "association KL", "better": "lower"},
              "utility": {"name": "text perplexity", "better": "lower"}}


def test_report_shows_the_probe_section_only_when_given(tmp_path):
    page = write_report(tmp_path / "r", POINTS, objectives=OBJECTIVES, probes=HAND).read_text(encoding="utf-8")
    assert "Where the model encodes group associations (FairMed probers)" in page
    assert page.count('<rect class="cell"') == 9 and 'id="fig-probes"' in page
    assert "grouped by concept" in page and "held-out" in page
    plain = build_report(POINTS, objectives=OBJECTIVES)["index.html"]
    assert "FairMed probers" not in plain and "fig-probes" not in plain
    with pytest.raises(ValueError, match="probe score 1 lacks majority_f1"):
        build_report(POINTS, objectives=OBJECTIVES, probes=[HAND[0], {"layer": 0, "attribute": "x", "macro_f1": 0.1}])
