"""The guards on the choice: a repair that sends every association prompt to one fixed distribution
scores kl_neutral ~0, yet is not chosen, and the reason is shown."""
import hashlib
import json
import re

import numpy as np
import pytest

from repair.guards import KL_UNIFORM, Guards
from repair.objectives import ConfigEvaluator, Objectives
from repair.runloop import choose
from repair.suites.base import EvalConfig, OptionScores
from tiny import ByteTokenizer

OBJ = Objectives.parse("association-neutral", "text")


def _noise(prompt: str, option: str) -> float:
    """A fixed pseudo-random log-probability per (prompt, option): the 'unrepaired model'."""
    h = hashlib.sha256(f"{prompt}|{option}".encode()).digest()
    return -1.0 - 3.0 * int.from_bytes(h[:4], "big") / 2 ** 32


class Variants:
    """An evaluator of n variants with known answers: variant v scores option o after prompt p as
    `fns[v](p, o)`; every variant has the same perplexity."""

    def __init__(self, *fns):
        self.fns = fns

    def score_choices_variants(self, requests, n_variants, desc=""):
        assert n_variants == len(self.fns)
        return [[OptionScores(np.array([fn(r.prompt, o) for o in r.options]), np.ones(len(r.options), np.int64))
                 for r in requests] for fn in self.fns]

    def token_nll_variants(self, tokens, window, stride, n_variants, desc=""):
        return [np.full(len(tokens) - 1, 2.0) for _ in range(n_variants)]


def _to_one_distribution(prompt: str, option: str) -> float:
    """Every prompt, neutral or not, gets the same distribution per attribute: most of the mass on
    the first form of the attribute's first group, whatever the prompt says."""
    return 0.0 if option in _FIRST else -5.0


_FIRST: set[str] = set()


@pytest.fixture(scope="module")
def rows():
    config = EvalConfig(split="select", limit=40, ppl_tokens=64, seed=0)
    evaluator = ConfigEvaluator(OBJ, config, ByteTokenizer(add_bos=True))
    suite = evaluator.suites["association"]
    _FIRST.update(" " + p.forms[0][0] for p in suite.prompts)  # each attribute's first group's first form
    base, gamed, mild = evaluator.evaluate(
        Variants(_noise, _to_one_distribution, lambda p, o: 0.97 * _noise(p, o)), 3, keep_units=True)
    return base, gamed, mild


def test_sending_every_prompt_to_one_distribution_scores_kl_neutral_near_zero(rows):
    base, gamed, _ = rows
    kn = "association/overall/kl_neutral"
    assert gamed["metrics"][kn]["value"] < 1e-3 < base["metrics"][kn]["value"]  # "fairer" by the number alone
    assert gamed["metrics"][KL_UNIFORM]["value"] > base["metrics"][KL_UNIFORM]["value"]


def test_the_gamed_transform_is_excluded_with_its_reasons_and_a_mild_one_is_chosen(rows):
    base, gamed, mild = rows
    selected = {"base": base, "gamed": gamed, "mild": mild}
    guards = Guards()
    excluded = {k: guards.failures(OBJ, base, r, 0.05) if k != "base" else [] for k, r in selected.items()}
    assert any(reason.startswith("kl_uniform rises") for reason in excluded["gamed"])
    assert any(reason.startswith("neutral reference moved") for reason in excluded["gamed"])
    # a mild change of every score (logits x 0.97: the distributions flatten a little) passes both guards
    assert excluded["mild"] == []
    assert gamed["fairness"] < mild["fairness"] < base["fairness"]  # gamed would win on kl_neutral alone
    assert choose(selected, "base", ["gamed", "mild"], excluded) == "mild"
    assert choose(selected, "base", ["gamed"], excluded) == "base"  # nothing eligible: the unrepaired model


def test_the_search_scores_a_configuration_past_the_guards_no_better_than_the_unrepaired_model(rows):
    base, gamed, mild = rows
    guards = Guards()
    b = base["metrics"]
    assert guards.guarded(mild["fairness"], base["fairness"], b, mild["metrics"]) == mild["fairness"]
    penalised = guards.guarded(gamed["fairness"], base["fairness"], b, gamed["metrics"])
    rise = gamed["metrics"][KL_UNIFORM]["value"] / b[KL_UNIFORM]["value"] - 1
    assert penalised >= base["fairness"] * (1 + rise - 0.02)  # the excess adds to the unrepaired model's score


def test_the_q_drift_bound_defaults_to_the_unrepaired_models_spread_and_can_be_set(rows):
    base, gamed, _ = rows
    spread = base["metrics"]["association/overall/q_spread"]["value"]
    assert 0 < spread < 1
    assert Guards().q_bound(base["metrics"]) == spread
    assert Guards(max_q_drift=100.0).q_bound(base["metrics"]) == 100.0
    loose = Guards(max_kl_uniform_rise=100.0, max_q_drift=100.0)
    assert loose.failures(OBJ, base, gamed, 0.05) == []  # both guards switched off: only utility is left


def test_a_run_whose_guards_exclude_every_finalist_keeps_and_exports_the_unrepaired_model(model_dir, tmp_path_factory, capsys):
    """--max-q-drift 1e-12: any repair moves the reference further, so every finalist is excluded; the
    run keeps the unrepaired model, names the guard each failed, and its card says so."""
    from conftest import small_run

    out = small_run(model_dir, tmp_path_factory, "guarded", "--max-q-drift", "1e-12")
    printed = capsys.readouterr().out
    candidates = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert candidates[0]["key"] == "base" and candidates[0]["chosen"]
    repaired = candidates[1:]
    assert repaired and all(any(r.startswith("neutral reference moved") and "--max-q-drift" in r for r in c["excluded_by"])
                            for c in repaired)
    assert "no repaired configuration passed the guards" in printed
    assert f"excluded on the select split by the guards: {len(repaired)} of {len(repaired)} verified" in printed
    manifest = json.loads((out / "checkpoint" / "repair_manifest.json").read_text())
    assert manifest["key"] == "base" and len(manifest["excluded_on_select"]) == len(repaired)
    card = (out / "checkpoint" / "README.md").read_text()
    assert "kept the **unrepaired model**" in card and "neutral reference moved" in card
    report = (out / "report" / "index.html").read_text()
    assert 'id="excluded"' in report and "neutral reference moved" in report
    # the front table marks each excluded point beside its numbers, not only in the section below it
    front = re.search(r'<table id="table-front">(.*?)</table>', report, re.S).group(1)
    rows = re.findall(r'<tr class="([^"]*)">(.*?)</tr>', front, re.S)
    assert "<th>Guards (select split)</th>" in front and rows
    for cls, cells in rows:
        if cls.split()[0] == "base":
            assert "excluded" not in cls
        else:
            assert "excluded" in cls.split() and "excluded: neutral reference moved" in cells
    assert "Spearman" in printed and "search vs select" in report
    summary = printed[printed.rindex("LLM evaluations"):].splitlines()
    texts = [line for line in summary if not line.startswith(("checkpoint: ", "report: "))]  # paths print whole
    assert len(summary) <= 40 and max(map(len, texts)) <= 80, summary  # one screen
