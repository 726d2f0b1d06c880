"""The held-out report split is only reported: the choice is made on the select split, before the report
split is touched, and does not change when the report split's items do."""
import dataclasses
import json

from conftest import SMALL, study_trials
from repair import runloop
from repair.cli import main


def _chosen(out):
    candidates = [json.loads(l) for l in (out / "candidates.jsonl").read_text().splitlines()]
    return next(c for c in candidates if c["chosen"]), candidates


def test_swapping_the_report_items_after_the_choice_keeps_the_choice(model_dir, tmp_path, monkeypatch):
    assert main(["run", "--model", str(model_dir), "--out", str(tmp_path / "a"), *SMALL]) == 0
    original = runloop.eval_config

    def other_report_items(config, split):  # the report split, but other prompts and other text
        cfg = original(config, split)
        return dataclasses.replace(cfg, split="search", limit=2, ppl_tokens=96) if split == "report" else cfg

    monkeypatch.setattr(runloop, "eval_config", other_report_items)
    assert main(["run", "--model", str(model_dir), "--out", str(tmp_path / "b"), *SMALL]) == 0
    (a, cands_a), (b, cands_b) = _chosen(tmp_path / "a"), _chosen(tmp_path / "b")
    assert a["key"] == b["key"] and a["select"] == b["select"]
    assert a["report"]["utility"] != b["report"]["utility"]  # the report items did change
    assert [c["key"] for c in cands_a] == [c["key"] for c in cands_b]


def test_the_choice_reads_select_records_before_any_report_evaluation(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"
    calls = []
    original = runloop.choose

    def spy(selected, base_key, allowed, excluded):
        name = f"repair-{out.name}"
        try:
            report_trials = study_trials(storage, f"{name}-report")
        except KeyError:  # the report study does not even exist yet
            report_trials = []
        select = {t.user_attrs["key"]: t.user_attrs for t in study_trials(storage, f"{name}-select")}
        calls.append((len(report_trials), {k: (v["fairness"], v["utility"]) for k, v in selected.items()},
                      {k: (select[k]["fairness"], select[k]["utility"]) for k in selected}))
        return original(selected, base_key, allowed, excluded)

    monkeypatch.setattr(runloop, "choose", spy)
    assert main(["run", "--model", str(model_dir), "--out", str(out), *SMALL]) == 0
    assert calls, "the choice was never made"
    for n_report, read, stored in calls:
        assert n_report == 0  # nothing was evaluated on the report split before the choice
        assert read == stored  # and what the choice read are the select split's records
