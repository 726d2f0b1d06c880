"""`repair evaluate --prune-heads SPEC`: the spec's forms and errors, and the metrics it gives checked
against an independently pruned checkpoint (o_proj columns zeroed by hand)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from repair.errors import UserError
from repair.methods.prune.masks import parse_head_spec
from tiny import tiny_checkpoint

HEADS = [[0, 1], [1, 0], [1, 3], [2, 2]]
QUICK = ["--no-progress", "--limit", "2", "--ppl-tokens", "128"]


def keep(spec: str, shape=(3, 4)) -> np.ndarray:
    return parse_head_spec(spec).keep_mask(*shape)


def test_pairs_text():
    mask = keep(" 0:1, 2:3 ,0:1")
    assert mask.dtype == bool and mask.shape == (3, 4)
    assert sorted(map(tuple, np.argwhere(~mask).tolist())) == [(0, 1), (2, 3)]


def test_json_forms_agree(tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(HEADS))
    manifest = tmp_path / "repair_manifest.json"
    manifest.write_text(json.dumps({"method": "prune", "pruned_heads": HEADS}))
    array = tmp_path / "mask.json"
    expected = np.ones((3, 4), dtype=bool)
    for l, h in HEADS:
        expected[l, h] = False
    array.write_text(json.dumps(expected.astype(int).tolist()))
    text = ",".join(f"{l}:{h}" for l, h in HEADS)
    for spec in (str(pairs), str(manifest), str(array), text):
        assert (keep(spec) == expected).all(), spec
    two_heads = tmp_path / "two.json"  # a 2-head model's mask needs the {"mask": ...} form
    two_heads.write_text(json.dumps({"mask": [[1, 0], [1, 1]]}))
    assert keep(str(two_heads), (2, 2)).tolist() == [[True, False], [True, True]]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert keep(str(empty)).all()  # nothing pruned: the plain model


@pytest.mark.parametrize("content, shape, words", [
    ("abc", None, "'abc' is not LAYER:HEAD"),
    ("0:1,", None, "'' is not LAYER:HEAD"),
    ("", None, "--prune-heads is empty"),
    ("missing.json", None, "does not exist"),
    ("3:0", (3, 4), "layer 3 is out of range (the model has layers 0..2)"),
    ("-1:0", (3, 4), "layer -1 is out of range"),
    ("0:4", (3, 4), "head 4 of layer 0 is out of range (the model has heads 0..3 in each layer)"),
    ("0:0,0:1,0:2,0:3,1:0,1:1,1:2,1:3,2:0,2:1,2:2,2:3", (3, 4), "prunes all 12 heads"),
])
def test_text_errors(content, shape, words):
    with pytest.raises(UserError) as e:
        spec = parse_head_spec(content)
        spec.keep_mask(*shape)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data, words", [
    ("[[0, 1],", "invalid JSON at line 1"),
    ([[1] * 5] * 3, "the mask is 3 x 5 but the model has 3 layers x 4 heads (give a 3 x 4 array"),
    ([[1] * 4] * 2, "give a 3 x 4 array"),
    ([[1, 1, 1, 1], [1, 1, 1]], "rows have different lengths"),
    ([[1, 1, 1, 1], [1, 2, 1, 1], [1, 1, 1, 1]], "must be 0 (prune) or 1 (keep), found 2"),
    ([[0, "a"]], "must hold integers"),
    ({"heads": []}, "'pruned_heads' or 'mask'"),
    (7, "expected a JSON list"),
    ([[0] * 4] * 3, "prunes all 12 heads"),
])
def test_file_errors(tmp_path, data, words):
    path = tmp_path / "spec.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(UserError) as e:
        parse_head_spec(str(path)).keep_mask(3, 4)
    assert words in str(e.value) and str(path) in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _metrics(path):
    report = json.loads(path.read_text())
    return {f"{s}/{k}": m for s, suite in report["suites"].items() for k, m in suite["metrics"].items()}, report


def test_prune_heads_equals_a_checkpoint_with_zeroed_heads(model_dir, tmp_path):
    """Second implementation: zero the o_proj input columns of the pruned heads by hand, save, evaluate."""
    zeroed = AutoModelForCausalLM.from_pretrained(model_dir)
    head_dim = zeroed.config.hidden_size // zeroed.config.num_attention_heads
    with torch.no_grad():
        for layer, head in HEADS:
            zeroed.model.layers[layer].self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    (tmp_path / "zeroed").mkdir()
    zeroed.save_pretrained(tmp_path / "zeroed")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "zeroed" / name).write_bytes((model_dir / name).read_bytes())
    mask = np.ones((3, 4), dtype=int)
    for l, h in HEADS:
        mask[l, h] = 0
    (tmp_path / "mask.json").write_text(json.dumps(mask.tolist()))

    runs = {
        "zeroed": ["--model", tmp_path / "zeroed"],
        "pairs": ["--model", model_dir, "--prune-heads", ",".join(f"{l}:{h}" for l, h in HEADS)],
        "mask": ["--model", model_dir, "--prune-heads", tmp_path / "mask.json"],
        "plain": ["--model", model_dir],
    }
    metrics, reports = {}, {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        result = run_cli("evaluate", *args, *QUICK, "--json", out, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[name], reports[name] = _metrics(out)
    assert reports["pairs"]["pruned_heads"] == HEADS and reports["mask"]["pruned_heads"] == HEADS
    assert "pruned_heads" not in reports["zeroed"]
    for name in ("pairs", "mask"):
        assert metrics[name].keys() == metrics["zeroed"].keys()
        for key, m in metrics["zeroed"].items():
            for field in ("value", "ci_low", "ci_high"):
                assert metrics[name][key][field] == pytest.approx(m[field], rel=1e-6, abs=1e-9), (name, key, field)
            assert metrics[name][key]["n"] == m["n"]
    # and the pruning did something: the unpruned model scores differently
    assert metrics["plain"]["text/overall/perplexity"]["value"] != pytest.approx(
        metrics["zeroed"]["text/overall/perplexity"]["value"], rel=1e-6)


def test_compare_pairs_the_two_models_on_the_same_items(model_dir, tmp_path):
    """--compare: both sides equal separate evaluations, and each change's paired interval holds it."""
    spec = ",".join(f"{l}:{h}" for l, h in HEADS)
    runs = {}
    for name, extra in (("plain", []), ("pruned", ["--prune-heads", spec]),
                        ("both", ["--prune-heads", spec, "--compare", str(model_dir)])):
        out = tmp_path / f"{name}.json"
        result = run_cli("evaluate", "--model", model_dir, *QUICK, "--json", out, *extra, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = json.loads(out.read_text())
        if name == "both":
            assert "change against --compare" in result.stdout and "half-width" in result.stdout
    changes = runs["both"]["compare"]["changes"]
    for key in ("association/overall/kl_uniform", "association/overall/kl_neutral", "text/overall/perplexity"):
        suite, metric = key.split("/", 1)
        c = changes[key]
        assert c["before"] == pytest.approx(runs["plain"]["suites"][suite]["metrics"][metric]["value"], rel=1e-9)
        assert c["after"] == pytest.approx(runs["pruned"]["suites"][suite]["metrics"][metric]["value"], rel=1e-9)
        assert c["delta_ci"][0] <= c["delta"] <= c["delta_ci"][1]
        assert c["relative"] == pytest.approx(c["after"] / c["before"] - 1)
