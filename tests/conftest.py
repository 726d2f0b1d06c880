import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))  # tests import fakes and tiny as plain modules


@pytest.fixture
def one_torch_thread():
    """Tiny torch ops (small models, the probers' L-BFGS steps) run faster on one thread on a busy
    two-core machine: a second thread only waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(*args, env=None, timeout=600):
    """Run `python -m repair ...` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "repair", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT,
    )


# A small `repair run` on a tiny random Llama: every phase runs, in seconds.
SMALL = ["--budget-evals", "26", "--rounds", "1", "--per-round", "4", "--max-prune", "0.5",
         "--search-limit", "1", "--search-ppl-tokens", "64", "--report-limit", "1", "--report-ppl-tokens", "64",
         "--verify-top", "3", "--batch-masks", "4", "--seed", "3"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from tiny import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def small_run(model_dir, tmp_path_factory, name: str, *flags) -> Path:
    """A SMALL `repair run FLAGS` of the tiny model, finished, in a fresh folder named after `name`."""
    from repair.cli import main

    out = tmp_path_factory.mktemp(name) / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(out), *SMALL, *flags]) == 0
    return out


ALL_BUDGET = 100
ALL = ["--method", "all", "--budget-shares", "prune=1,fairmed=1,fairsteer=1,experts=1", "--export-all"]


def all_flags():
    """SMALL with the budget shared by four and no surrogate rounds (each method's rounds are tested
    in its own run; here what matters is how the methods meet)."""
    flags = list(SMALL)
    flags[flags.index("--budget-evals") + 1] = str(ALL_BUDGET)
    flags[flags.index("--rounds") + 1] = "0"
    return flags


@pytest.fixture(scope="session")
def all_run(tmp_path_factory, worker_id):
    """A SMALL `--method all --export-all` run of its own tiny model (`all_run.parent / "model"`): a
    checkpoint of every kind (pruned, FairMed, FairSteer, experts, a stack) and a study of every
    method. Built once for the whole test session: under pytest-xdist the first worker to need it
    builds it in the workers' shared temporary folder, holding a lock the others wait on. Tests only
    read it (one that resumes or changes a run copies it first)."""
    from filelock import FileLock

    from repair.cli import main
    from tiny import tiny_checkpoint

    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker_id != "master" else root
    out = root / "all-shared" / "run"
    with FileLock(str(root / "all-shared.lock")):
        if not (out.parent / "built").is_file():
            shutil.rmtree(out.parent, ignore_errors=True)
            model = tiny_checkpoint(out.parent / "model")
            assert main(["run", "--model", str(model), "--out", str(out), *all_flags(), *ALL]) == 0
            (out.parent / "built").write_text("")
    return out


@pytest.fixture(scope="session")
def finished_run(model_dir, tmp_path_factory):
    """One uninterrupted SMALL run, shared by the tests that read a finished run; its
    `failpoints.log` lists every crash point it passed (for the crash tests)."""
    from repair.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    log = out.parent / "failpoints.log"
    os.environ["REPAIR_FAILPOINT_LOG"] = str(log)
    try:
        assert main(["run", "--model", str(model_dir), "--out", str(out), *SMALL]) == 0
    finally:
        del os.environ["REPAIR_FAILPOINT_LOG"]
    return out


def study_trials(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def stored(storage: str, name: str) -> dict:
    """A study's COMPLETE trials by configuration key, asserting that none is stored twice."""
    done = [t for t in study_trials(storage, name) if t.state.name == "COMPLETE"]
    keys = [t.user_attrs["key"] for t in done]
    assert len(keys) == len(set(keys)), "a configuration was stored twice"
    return {t.user_attrs["key"]: t for t in done}


def as_a_worker(run: Path):
    """What a `repair worker` builds from a finished run's study alone (the run's published artifacts
    included): (the run's config, the loaded model, every method of the run, the study)."""
    import optuna

    from repair.methods import build
    from repair.models import load_model
    from repair.worker import WorkerConfig, run_config_from_study

    storage, name = f"sqlite:///{run / 'study.db'}", f"repair-{run.name}"
    study = optuna.load_study(study_name=name, storage=storage)
    config = run_config_from_study(study, WorkerConfig(storage, name, device="cpu"))
    loaded = load_model(config.model)
    methods = build(config, loaded.model)
    for method in methods.values():
        method.load_artifacts(study.user_attrs)
    return config, loaded, methods, study


def rescore_as_a_worker(run: Path, method_name: str, n: int = 3):
    """A worker's scorer (`as_a_worker`) scores the first `n` completed configurations of
    `method_name` on the search split: (their trials, the fresh rows)."""
    from repair.objectives import Objectives
    from repair.runloop import SPLITS, Scorer, eval_config

    config, loaded, methods, study = as_a_worker(run)
    scorer = Scorer(loaded, Objectives.parse(config.fairness, config.utility), {s: eval_config(config, s) for s in SPLITS}, methods,
                    config.panel_bbq_limit)
    try:
        done = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["key"].startswith(f"{method_name}:")][:n]
        return done, scorer.scorer("search")([t.user_attrs["key"] for t in done])
    finally:
        scorer.close()
