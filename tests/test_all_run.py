"""`repair run --method all` end to end on a tiny random Llama: every method searched in one study
with its share of the budget, the best of each pair of methods stacked and verified with them, one
choice over all, the per-method costs, the report's select view and cost table, --export-all and a
stacked checkpoint that reloads as the composition of its parts, a resume that evaluates nothing
again, a worker that scores any method's configurations and stacks alike."""
import json
import re
from itertools import combinations

import pytest
import torch

from conftest import ALL, ALL_BUDGET as BUDGET, all_flags as _flags, as_a_worker, rescore_as_a_worker, stored
from repair.errors import UserError
from repair.methods import METHODS, method_configs, method_names, shares
from repair.methods.experts.space import ExpertSpace
from repair.rundir import RunConfig
from repair.space import BASE, STACK, method_of, parts, stack_key

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 7, 100, 3]])


def _trials(run):
    return stored(f"sqlite:///{run / 'study.db'}", f"repair-{run.name}")


def _completed_keys(run) -> list[str]:
    """Keys of the search study's completed trials, read straight from its SQLite file (the run may be
    writing it; no Optuna storage set-up)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{run / 'study.db'}?mode=ro", uri=True, timeout=1) as db:
            rows = db.execute("SELECT a.value_json FROM trial_user_attributes a JOIN trials t ON a.trial_id = t.trial_id "
                              "WHERE a.key = 'key' AND t.state = 'COMPLETE'").fetchall()
    except sqlite3.Error:
        return []
    return [json.loads(v) for (v,) in rows]


def _candidates(run):
    return [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]


def test_one_probe_pass_is_kept_and_both_fits_name_it(all_run):
    """FairMed's probers and FairSteer's steering were fitted on the run's one pass, kept once in the run
    folder with its sha256 (no method keeps activations of its own)."""
    from repair.io import sha256_file

    record = json.loads((all_run / "probe-pass.json").read_text())
    assert record["sha256"] == sha256_file(all_run / "probe-pass.npz") and set(record["key"]["sites"]) == {"mlp", "residual"}
    assert json.loads((all_run / "fairmed" / "probe-scores.json").read_text())["activations_sha256"] == record["sha256"]
    assert json.loads((all_run / "fairsteer" / "steering.json").read_text())["activations_sha256"] == record["sha256"]
    assert not list(all_run.glob("*/activations.npz"))


# ---- parsing ------------------------------------------------------------------------------------


def test_method_lists_are_parsed_in_one_order_and_unknown_names_refused():
    assert method_names("all") == tuple(METHODS)
    assert method_names("experts, prune") == ("prune", "experts")
    for bad, word in (("prune,pruning", "unknown method 'pruning'"), ("prune,,fairmed", "an empty name"),
                      ("prune,prune", "names a method twice")):
        with pytest.raises(UserError, match=re.escape(word)):
            method_names(bad)


def test_budget_shares_default_and_given_are_normalised_over_the_methods_run(tmp_path):
    two = RunConfig(out=tmp_path, method="prune,fairsteer", budget_evals=120)
    expected = 0.35 / (0.35 + 0.25)  # prune's and fairsteer's default shares
    assert shares(two)["prune"] == pytest.approx(expected)
    given = RunConfig(out=tmp_path, method="all", budget_evals=100, budget_shares="prune=2,fairmed=1,fairsteer=1,experts=1")
    configs = method_configs(given)
    assert {m: c.budget_evals for m, c in configs.items()} == {"prune": 40, "fairmed": 20, "fairsteer": 20, "experts": 20}
    assert {c.method for c in configs.values()} == set(METHODS)
    for bad in ("prune=1", "prune=1,fairmed=0,fairsteer=1,experts=1", "prune=1,bogus=1"):
        with pytest.raises(UserError):
            shares(RunConfig(out=tmp_path, method="all", budget_shares=bad))


def test_stack_keys_list_their_parts_in_the_methods_order():
    a, b = "prune:ff0f", "fairsteer:3/alpha=0.3/gate=q0.5"
    key = stack_key([b, a], METHODS)
    assert key == stack_key([a, b], METHODS) == f"stack:{a}+{b}"
    assert method_of(key) == STACK and parts(key) == {"prune": a, "fairsteer": b}
    assert parts(BASE) == {} and parts(a) == {"prune": a}
    with pytest.raises(ValueError):
        stack_key([a, "prune:0000"], METHODS)


# ---- the run ------------------------------------------------------------------------------------


def test_every_method_searches_within_its_share_in_one_study(all_run):
    trials = _trials(all_run)
    by_method = {m: {k for k in trials if method_of(k) == m} for m in METHODS}
    costs = {r["method"]: r for r in json.loads((all_run / "costs.json").read_text())["rows"]}
    for m in METHODS:
        assert by_method[m], m
        assert len(by_method[m]) <= BUDGET // 4, m  # the equal shares: 25 each
        assert costs[m]["evaluations"] == len(by_method[m]), m
    assert by_method["experts"] == set(ExpertSpace().enumerate())  # the whole grid, within its share


def test_stacks_are_every_pair_of_bests_and_the_choice_is_the_fairest_within_the_limit(all_run):
    cands = {c["key"]: c for c in _candidates(all_run)}
    best = {m: next(k for k, c in cands.items() if m in c["best_of"]) for m in METHODS
            if any(m in c["best_of"] for c in cands.values())}
    repaired = [best[m] for m in METHODS if m in best]
    stacks = {stack_key(pair, METHODS) for pair in combinations(repaired, 2)}
    assert stacks and {k for k in cands if method_of(k) == STACK} == stacks
    trials = _trials(all_run)
    for key in stacks:  # evaluated on every split, each part a method's best
        assert trials[key].user_attrs["phase"] == STACK
        assert cands[key]["select"] is not None and cands[key]["report"] is not None
        assert all(best[m] == k for m, k in parts(key).items())
    for key in best.values():
        assert cands[key]["report"] is not None
    # the choice, recomputed from the select split's numbers: the lowest fairness among the methods'
    # finalists and the stacks whose perplexity stays within 5% of the unrepaired model's there
    limit = cands[BASE]["select"]["utility"] * 1.05
    allowed = [k for k, c in cands.items() if k != BASE and set(c["methods"]) & {*METHODS, STACK}
               and c["select"]["utility"] <= limit]
    expected = min(allowed, key=lambda k: (cands[k]["select"]["fairness"], k)) if allowed else BASE
    assert [k for k, c in cands.items() if c["chosen"]] == [expected]


def test_costs_count_what_each_repair_adds(all_run):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    costs = json.loads((all_run / "costs.json").read_text())
    rows = {r["method"]: r for r in costs["rows"]}
    assert set(rows) == {*METHODS, STACK}
    assert rows["prune"]["extra_parameters"] == 0
    n_experts = 0
    for folder in ("expert", "anti_expert"):
        with safe_open(str(all_run / "checkpoints" / "experts" / folder / "top.safetensors"), "pt") as f:
            n_experts += sum(f.get_tensor(k).numel() for k in f.keys())
    # the experts' trained top layers over the target's trunk: every layer of the 3-layer tiny model, no embeddings
    per_layer = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(all_run.parent / "model").model.layers[0].parameters())
    assert rows["experts"]["extra_parameters"] == n_experts == 2 * 3 * per_layer
    with safe_open(str(all_run / "checkpoints" / "fairsteer" / "interventions.safetensors"), "pt") as f:
        assert rows["fairsteer"]["extra_parameters"] == sum(f.get_tensor(k).numel() for k in f.keys())
    for r in rows.values():
        assert r["generation_slowdown"] > 0 and r["seconds"] > 0
    timing = json.loads((all_run / "timing.json").read_text())
    assert set(timing) == {*METHODS, STACK, "held-out"}


def test_report_shows_the_select_view_the_costs_and_each_methods_colour(all_run):
    page = (all_run / "report" / "index.html").read_text()
    assert 'id="fig-select"' in page and 'id="costs"' in page and "best of its method" in page
    from reports.figures import METHOD_COLOURS

    for m in METHODS:
        assert METHOD_COLOURS[m] in page, m
    cands = _candidates(all_run)
    select_svg = page.split('id="fig-select"', 1)[1].split("</figure>", 1)[0]
    assert select_svg.count("<circle") == len(cands)  # every verified configuration, on the select split
    report_svg = page.split('id="fig-front"', 1)[1].split("</figure>", 1)[0]
    assert report_svg.count("<circle") == sum(c["report"] is not None for c in cands)


def test_export_all_writes_each_best_and_a_stack_reloads_as_its_parts_composed(all_run):
    import repair
    from repair.load import attach_saved

    model_dir = all_run.parent / "model"

    cands = _candidates(all_run)
    for c in cands:
        for m in c["best_of"]:
            if m in METHODS or m == STACK:
                manifest = json.loads((all_run / "checkpoints" / m / "repair_manifest.json").read_text())
                assert manifest["key"] == c["key"] and manifest["method"] == m
    stack = json.loads((all_run / "checkpoints" / STACK / "repair_manifest.json").read_text())
    stacked, _ = repair.load(all_run / "checkpoints" / STACK)
    # the same repair put together by hand: the pruned part's checkpoint (or the base model), then each
    # hooked part's own checkpoint attached on top
    found = parts(stack["key"])
    from transformers import AutoModelForCausalLM

    start = all_run / "checkpoints" / "prune" if "prune" in found else model_dir
    by_hand = AutoModelForCausalLM.from_pretrained(start).eval()
    hooks = [attach_saved(by_hand, all_run / "checkpoints" / m) for m in found if m != "prune"]
    transform = next((h for h in hooks if getattr(h, "transforms_outputs", False)), None)
    with torch.inference_mode():
        want = transform.logits(IDS) if transform is not None else by_hand(IDS).logits
        got = stacked.repair_interventions[0].logits(IDS) if stacked.repair_interventions else stacked(IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(IDS).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the stack repairs something


def test_a_stack_scores_what_its_parts_attached_together_score(all_run):
    """The batched per-row evaluation of a stack (the scorer, as a worker builds it) equals attaching
    its parts to the model for a plain single-configuration evaluation."""
    from repair.evaluator import Evaluator
    from repair.objectives import ConfigEvaluator, Objectives
    from repair.runloop import eval_config
    from repair.stacks import apply

    config, loaded, methods, _ = as_a_worker(all_run)
    trials = _trials(all_run)
    key = next(k for k in trials if method_of(k) == STACK and "experts" not in parts(k))
    objectives = ConfigEvaluator(Objectives.parse(config.fairness, config.utility), eval_config(config, "search"), loaded.tokenizer)
    applied = apply(methods, loaded.model, key)
    try:
        row = objectives.evaluate(Evaluator(loaded.model, loaded.tokenizer), 1)[0]
    finally:
        applied.remove()
    assert row["fairness"] == pytest.approx(trials[key].values[0], rel=1e-4, abs=1e-7)
    assert row["utility"] == pytest.approx(trials[key].user_attrs["utility"], rel=1e-5)


def test_a_worker_scores_stacks_and_every_method_as_the_run_did(all_run):
    for prefix in (*METHODS, STACK):
        trials, rows = rescore_as_a_worker(all_run, prefix, n=2)
        assert rows, prefix
        for t, row in zip(trials, rows):
            assert row["fairness"] == pytest.approx(t.values[0], abs=1e-9), t.user_attrs["key"]


def test_a_rerun_resumes_without_evaluating_again_and_prints_one_screen(all_run, tmp_path, capsys):
    import shutil

    from repair.cli import main

    run = shutil.copytree(all_run, tmp_path / "run")  # the shared run stays as it is for the other tests
    before = {k: t.number for k, t in _trials(run).items()}
    chosen = [c["key"] for c in _candidates(run) if c["chosen"]]
    capsys.readouterr()
    assert main(["run", "--model", str(all_run.parent / "model"), "--out", str(run), *_flags(), *ALL]) == 0
    printed = capsys.readouterr().out
    summary = printed[printed.rindex("LLM evaluations"):].strip().splitlines()
    assert summary[-1].startswith("report:")
    texts = [line for line in summary if not line.startswith(("checkpoint: ", "report: "))]  # paths print whole
    assert len(summary) <= 40 and max(map(len, texts)) <= 80, summary  # one screen at 80 columns
    assert sum(line.startswith(f"  {m} ") for line in summary for m in METHODS) == len(METHODS)  # each method's best
    assert {k: t.number for k, t in _trials(run).items()} == before
    assert [c["key"] for c in _candidates(run) if c["chosen"]] == chosen


def test_a_run_killed_in_the_second_methods_search_resumes_to_the_same_result(all_run, tmp_path):
    """SIGKILL once FairMed has stored evaluations (prune's search is done by then), rerun: nothing is
    evaluated twice and the run ends where the uninterrupted one did."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from repair.cli import main

    out = tmp_path / "run"
    args = ["run", "--model", str(all_run.parent / "model"), "--out", str(out), *_flags(), *ALL]
    proc = subprocess.Popen([sys.executable, "-m", "repair", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "study.db").is_file() and any(method_of(k) == "fairmed" for k in _completed_keys(out)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        returncode = proc.wait()
    assert returncode == -signal.SIGKILL, "the run ended before FairMed's evaluations were seen"
    partial = _trials(out)
    assert any(method_of(k) == "fairmed" for k in partial) and not any(method_of(k) == "experts" for k in partial)
    assert main(["run", "--model", str(all_run.parent / "model"), "--out", str(out), *_flags(), *ALL]) == 0
    resumed, uninterrupted = _trials(out), _trials(all_run)
    assert set(resumed) == set(uninterrupted)
    for k, t in partial.items():  # kept, not evaluated again
        assert resumed[k].number == t.number
    for k, t in resumed.items():
        assert t.values[0] == pytest.approx(uninterrupted[k].values[0], rel=1e-6, abs=1e-9), k
    assert [c["key"] for c in _candidates(out) if c["chosen"]] == [c["key"] for c in _candidates(all_run) if c["chosen"]]
