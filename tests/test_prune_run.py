"""`repair run --method prune` end to end on a tiny random Llama: export, records, resume, bad input."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, SMALL, run_cli
from repair.cli import main


def _trials(out):
    with sqlite3.connect(out / "study.db") as db:
        rows = db.execute("select t.state, a.value_json from trials t join trial_user_attributes a "
                          "on a.trial_id = t.trial_id and a.key = 'key' join studies s on s.study_id = t.study_id "
                          "where s.study_name not like '%-report' and s.study_name not like '%-select'").fetchall()
    return rows


def test_checkpoint_equals_independently_pruned_model(finished_run, model_dir):
    manifest = json.loads((finished_run / "checkpoint" / "repair_manifest.json").read_text())
    heads = manifest["pruned_heads"]
    exported = AutoModelForCausalLM.from_pretrained(finished_run / "checkpoint").eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    head_dim = reference.config.hidden_size // reference.config.num_attention_heads
    with torch.no_grad():  # second implementation: zero the o_proj columns by hand
        for layer, head in heads:
            reference.model.layers[layer].self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    with torch.inference_mode():
        assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-5)
    assert manifest["method"] == "prune"
    assert (manifest["chosen_on"], manifest["reported_on"]) == ("select", "report")
    for split in ("search", "select", "report"):
        for side in ("base", "repaired"):
            entry = manifest["metrics"][split][side]
            assert {"fairness", "utility", "association/overall/kl_uniform", "association/overall/kl_neutral",
                    "text/overall/perplexity"} <= set(entry)
            kl = entry["association/overall/kl_neutral"]  # the default objective
            assert kl["ci_low"] <= entry["fairness"] == kl["value"] <= kl["ci_high"]
    assert manifest["objectives"]["fairness"]["better"] == "lower"
    assert (finished_run / "checkpoint" / "README.md").read_text().startswith("# Fairness-repaired")


def test_reported_numbers_reproduce_from_the_checkpoint(finished_run):
    """Evaluating the exported checkpoint anew on the report split gives the manifest's numbers."""
    manifest = json.loads((finished_run / "checkpoint" / "repair_manifest.json").read_text())
    out = finished_run.parent / "check.json"
    assert main(["evaluate", "--model", str(finished_run / "checkpoint"), "--suite", "association,text",
                 "--split", "report", "--limit", "1", "--ppl-tokens", "64", "--no-progress", "--json", str(out)]) == 0
    fresh = json.loads(out.read_text())["suites"]
    repaired = manifest["metrics"]["report"]["repaired"]
    for metric in ("kl_neutral", "kl_uniform"):
        assert fresh["association"]["metrics"][f"overall/{metric}"]["value"] == pytest.approx(
            repaired[f"association/overall/{metric}"]["value"], abs=1e-5)
    assert fresh["association"]["metrics"]["overall/kl_neutral"]["value"] == pytest.approx(repaired["fairness"], abs=1e-5)
    assert fresh["text"]["metrics"]["overall/perplexity"]["value"] == pytest.approx(repaired["utility"], rel=1e-5)


def test_records_are_unique_and_complete(finished_run):
    rows = _trials(finished_run)
    keys = [k for state, k in rows if state == "COMPLETE"]
    assert len(keys) == len(set(keys)) and len(keys) >= 20
    candidates = [json.loads(l) for l in (finished_run / "candidates.jsonl").read_text().splitlines()]
    assert candidates[0]["config"]["pruned_heads"] == [] and sum(c["chosen"] for c in candidates) == 1
    for c in candidates:
        assert set(c) >= {"search", "select", "report", "config", "key", "changes"}
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen["report"] is not None and candidates[0]["report"] is not None  # measured on report after the choice


def test_report_is_written(finished_run):
    html = (finished_run / "report" / "index.html").read_text()
    assert 'id="fig-front"' in html and "unrepaired" in html
    rows = (finished_run / "report" / "pareto.csv").read_text().splitlines()
    assert rows[0].startswith("name,") and len(rows) >= 2
    assert main(["report", str(finished_run)]) == 0  # rebuilds from the records


def test_rerun_resumes_without_new_evaluations(finished_run, model_dir):
    before = _trials(finished_run)
    chosen = json.loads((finished_run / "checkpoint" / "repair_manifest.json").read_text())["pruned_heads"]
    assert main(["run", "--model", str(model_dir), "--out", str(finished_run), *SMALL]) == 0
    assert _trials(finished_run) == before
    assert json.loads((finished_run / "checkpoint" / "repair_manifest.json").read_text())["pruned_heads"] == chosen


@pytest.mark.parametrize("extra, expected", [
    (["--method", "bogus"], "--method bogus: unknown method 'bogus'"),
    (["--fairness", "vibes"], "unknown fairness objective 'vibes'"),
    (["--utility", "bleu"], "unknown utility objective 'bleu'"),
    (["--budget-evals", "10"], "the surrogates need at least 20"),
    (["--max-prune", "1.5"], "--max-prune must be a fraction"),
    (["--storage", "postgresql://user:s3cret@127.0.0.1:1/nowhere"], "cannot open the study storage"),
])
def test_bad_run_input_is_one_line_exit_2(model_dir, tmp_path, extra, expected):
    out = tmp_path / "out"
    result = run_cli("run", "--model", model_dir, "--out", out, *SMALL, *extra, timeout=120)
    assert result.returncode == 2, result.stderr[-1500:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "s3cret" not in result.stderr
    assert not out.exists()  # nothing half-written


def test_out_dir_with_other_config_is_refused(finished_run, model_dir):
    result = run_cli("run", "--model", model_dir, "--out", finished_run, *SMALL[:-1], "4", timeout=120)
    assert result.returncode == 2 and "different configuration (seed differ)" in result.stderr


def test_out_path_that_is_a_file_is_refused(model_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    result = run_cli("run", "--model", model_dir, "--out", tmp_path / "f", *SMALL, timeout=120)
    assert result.returncode == 2 and "is a file" in result.stderr


def test_baselines_share_budget_and_are_reported(model_dir, tmp_path):
    out = tmp_path / "baselines"
    assert main(["run", "--model", str(model_dir), "--out", str(out), *SMALL, "--baselines", "random,knockout"]) == 0
    methods = json.loads((out / "methods.json").read_text())
    assert set(methods) == {"prune", "random", "knockout"}
    assert methods["random"]["evaluations"] == 1 + 26  # the unrepaired model + the budget
    # tiny Llama: 12 heads, so all 12 knockouts + min(8, 6 = 50% of 12) ranked levels
    assert methods["knockout"]["evaluations"] == 1 + 12 + 6
    # the ranked levels follow the knockout records: recompute the ranking independently
    with sqlite3.connect(out / "study.db") as db:
        rows = db.execute("select a.value_json, p.value_json, v.objective, v.value from trials t "
                          "join trial_user_attributes a on a.trial_id = t.trial_id and a.key = 'key' "
                          "join trial_user_attributes p on p.trial_id = t.trial_id and p.key = 'phase' "
                          "join trial_values v on v.trial_id = t.trial_id join studies s on s.study_id = t.study_id "
                          "where t.state = 'COMPLETE' and s.study_name not like '%-report' "
                          "and s.study_name not like '%-select'").fetchall()
    from repair.methods.prune.space import HeadMaskSpace
    space = HeadMaskSpace((3, 4), max_prune=6)
    values = {}
    for key, phase, objective, value in rows:
        values.setdefault(json.loads(key), {})[objective] = value
    base = values[space.key(np.ones(12, dtype=bool))]
    knock = {i: values[space.key(np.arange(12) != i)] for i in range(12)}
    cost = sorted(knock, key=lambda i: knock[i][1] - base[1], reverse=True)[:3]  # 20% of 12, rounded up
    ranked = [i for i in sorted(knock, key=lambda i: knock[i][0] - base[0]) if i not in cost]
    deepest = np.ones(12, dtype=bool)
    deepest[ranked[:6]] = False
    assert space.key(deepest) in values
    html = (out / "report" / "index.html").read_text()
    assert "random" in html and "knockout" in html
