"""Crash safety: SIGKILL `repair run` at a random point of every phase, rerun, compare.

One run directory is killed once per phase, in phase order (each rerun gets through the phases
already killed and dies in the next), then finished by a plain rerun. The kill points come from
`repair.failpoints`; the uninterrupted `finished_run` logged how many each phase has, and each
kill picks one of them at random (seeded, printed on failure).
"""
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter

import pytest
from safetensors import safe_open

from conftest import ROOT, SMALL, stored, study_trials

PHASES = ("sampling", "fitting", "annealing", "verification", "export")


def _study(out, report):
    return f"sqlite:///{out / 'study.db'}", f"repair-{out.name}" + ("-report" if report else "")


def trials(out, report=False):
    return study_trials(*_study(out, report))


def complete_values(out, report=False):
    return {k: t.values for k, t in stored(*_study(out, report)).items()}


def assert_nothing_half_written(out):
    """Under their final names there is either nothing or a complete artefact."""
    ckpt = out / "checkpoint"
    if ckpt.exists():
        assert {"config.json", "model.safetensors", "repair_manifest.json", "README.md"} <= {p.name for p in ckpt.iterdir()}
        json.loads((ckpt / "repair_manifest.json").read_text())
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            assert len(list(f.keys())) > 0
    report = out / "report"
    if report.exists():
        assert (report / "index.html").read_text().rstrip().endswith("</html>")
        json.loads((report / "pareto.json").read_text())
    for plan in (out / "surrogates").glob("*.json") if (out / "surrogates").exists() else []:
        json.loads(plan.read_text())


def assert_close_nested(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close_nested(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, float):
        # abs: a value near zero that is the difference of two log-likelihoods scored in other batches
        # (the conditional pairs' gap, a sum over a sentence's tokens) keeps float32's absolute noise, not a
        # relative one: ~1e-8 a term, up to 2e-7 on a pair's interval bound since rows are prefix trees
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), path
    else:
        assert a == b, path


def test_killed_in_every_phase_resumes_to_the_uninterrupted_result(finished_run, model_dir, tmp_path):
    counts = Counter((finished_run.parent / "failpoints.log").read_text().split())
    assert all(counts[p] > 0 for p in PHASES), counts
    rng = random.Random(20261122)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "repair", "run", "--model", str(model_dir), "--out", str(out), *SMALL]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kills = []
    for phase in PHASES:
        point = rng.randint(1, counts[phase])
        kills.append(f"{phase}:{point}")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**env, "REPAIR_KILL_AT": kills[-1]})
        assert proc.returncode == -signal.SIGKILL, (kills, proc.stderr[-2000:])
        assert_nothing_half_written(out)
        complete_values(out)  # no configuration stored twice, after every crash
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (kills, proc.stderr[-2000:])

    for report in (False, True):  # the same configurations, each stored once, with the same values
        got, want = complete_values(out, report), complete_values(finished_run, report)
        assert sorted(got) == sorted(want), kills
        for key in want:
            # a resumed batch holds other configurations beside a key's, so float32 sums run in another order:
            # a value near 0 (a tiny model's KL of 4e-5) moves by about 4e-11, hence an absolute floor
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (kills, key)
    # a killed evaluation is failed and redone, never counted: every FAIL has its one COMPLETE twin
    failed = [t.user_attrs["key"] for t in trials(out) + trials(out, True) if t.state.name == "FAIL"]
    assert set(failed) <= set(complete_values(out)) | set(complete_values(out, True))

    manifests = [json.loads((d / "checkpoint" / "repair_manifest.json").read_text()) for d in (out, finished_run)]
    assert manifests[0]["pruned_heads"] == manifests[1]["pruned_heads"], kills
    assert_close_nested(manifests[0]["metrics"], manifests[1]["metrics"])
    candidates = [[json.loads(l) for l in (d / "candidates.jsonl").read_text().splitlines()] for d in (out, finished_run)]
    assert [(c["key"], c["chosen"]) for c in candidates[0]] == [(c["key"], c["chosen"]) for c in candidates[1]]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_surrogate_targets_drop_the_noise_of_another_batch():
    """The same configuration scored in another batch differs by ~1e-7 relative; the surrogates see
    both as one value (4 significant digits, known answers), and infinities and zeros pass unchanged."""
    import numpy as np

    from repair.runloop import _reproducible

    once = np.array([0.0123456789, -2.71828e-5, 14.62043, 0.0, np.inf])
    again = once * (1 + 1e-7)
    np.testing.assert_array_equal(_reproducible(once), [0.01235, -2.718e-5, 14.62, 0.0, np.inf])
    np.testing.assert_array_equal(_reproducible(again), _reproducible(once))
