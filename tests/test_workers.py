"""Distributed evaluation on a real PostgreSQL server: `repair run` and `repair worker` processes share
one Optuna study; the records must equal the single-process run's (`finished_run`, SQLite)."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, stored, study_trials
from repair.errors import UserError

PG = os.environ.get("REPAIR_TEST_POSTGRES")
pytestmark = pytest.mark.skipif(not PG, reason="needs REPAIR_TEST_POSTGRES: run through bin/test, which creates a fresh database")


def start(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "repair", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err[-3000:]


def assert_same_records(name, finished_run):
    """Same configurations, each evaluated once, same values as the single-process run."""
    local = f"sqlite:///{finished_run / 'study.db'}"
    for suffix in ("", "-report"):
        got, want = stored(PG, name + suffix), stored(local, f"repair-{finished_run.name}{suffix}")
        assert sorted(got) == sorted(want)
        for key, t in want.items():
            # float32 sums over other batch compositions: a KL of 5e-5 (the unrepaired model's own) once
            # differed by 6e-11, which is 1.2e-6 of it
            assert got[key].values == pytest.approx(t.values, rel=1e-6, abs=1e-9), key


def owners(records):
    return {int(t.user_attrs["owner"].rpartition(":")[2]) for t in records}


def test_coordinator_and_two_workers_share_one_study(finished_run, model_dir, tmp_path):
    name = "two-workers"
    # workers may start before the coordinator has published its run: they wait for it
    workers = [start("worker", "--storage", PG, "--study", name, "--poll", "0.2", "--batch-masks", "4")]
    coordinator = start("run", "--model", model_dir, "--out", tmp_path / "run", *SMALL, "--storage", PG, "--study", name, "--heartbeat", "1")
    workers += [start("worker", "--storage", PG, "--study", name, "--poll", "0.2", "--batch-masks", "4")]
    rc, err = finish(coordinator)
    assert rc == 0, err
    for w in workers:
        rc, err = finish(w)
        assert rc == 0, err
    assert_same_records(name, finished_run)
    everyone = {coordinator.pid} | {w.pid for w in workers}
    assert owners(stored(PG, name).values()) | owners(stored(PG, name + "-report").values()) <= everyone


def test_killed_worker_is_replaced_through_the_heartbeat(finished_run, model_dir, tmp_path):
    name = "killed-worker"
    coordinator = start("run", "--model", model_dir, "--out", tmp_path / "run", *SMALL, "--storage", PG, "--study", name,
                        "--heartbeat", "1", "--workers-only")
    # the first worker dies with a claimed batch after storing its first configuration of it
    doomed = start("worker", "--storage", PG, "--study", name, "--batch-masks", "4", env={"REPAIR_KILL_AT": "sampling:2"})
    assert finish(doomed)[0] == -signal.SIGKILL
    survivor = start("worker", "--storage", PG, "--study", name, "--poll", "0.2", "--batch-masks", "4")
    rc, err = finish(coordinator)
    assert rc == 0, err
    rc, err = finish(survivor)
    assert rc == 0, err

    failed = [t for t in study_trials(PG, name) if t.state.name == "FAIL"]
    done = stored(PG, name)
    assert len(failed) == 3 and owners(failed) == {doomed.pid}  # its batch of 4, one stored before the kill
    assert {owners([done[t.user_attrs["key"]]]).pop() for t in failed} == {survivor.pid}  # redone by the other
    assert owners(done.values()) == {doomed.pid, survivor.pid}  # --workers-only: the coordinator evaluated nothing
    assert_same_records(name, finished_run)


def test_worker_with_another_model_is_refused_and_one_with_a_copy_joins(model_dir, tmp_path):
    """The run's identity holds its weights' fingerprint: a worker pointed at other weights is refused in
    one line before loading anything; a copy of the run's weights under another path is accepted."""
    import shutil

    from tiny import tiny_checkpoint

    name = "other-model"
    coordinator = start("run", "--model", model_dir, "--out", tmp_path / "run", *SMALL, "--storage", PG, "--study", name,
                        "--device", "cpu", env={"REPAIR_KILL_AT": "sampling:1"})  # publishes its run, enqueues, dies
    assert finish(coordinator)[0] == -signal.SIGKILL
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    rc, err = finish(start("worker", "--storage", PG, "--study", name, "--model", other, "--device", "cpu", "--max-idle", "5"), 120)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "(different model weights: point --model at a copy of the run's model" in lines[0], err
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    worker = start("worker", "--storage", PG, "--study", name, "--model", copy, "--device", "cpu", "--poll", "0.2",
                   "--max-idle", "2", "--batch-masks", "4")
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0 and "worker: evaluated 0 " not in out, err[-3000:]
    assert len(stored(PG, name)) > 1  # the configurations the coordinator left waiting


def test_worker_for_a_study_that_never_appears_gives_up_in_one_line():
    rc, err = finish(start("worker", "--storage", PG, "--study", "nobody-started-this", "--poll", "0.2", "--max-idle", "1"), 60)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "no study named 'nobody-started-this'" in lines[0], err


def test_processes_opening_a_fresh_database_together_all_succeed():
    """Coordinator and workers often start at once on an empty database: they race to create
    Optuna's tables, and the losers must retry rather than fail."""
    tool = [sys.executable, str(ROOT / "bin" / "test-postgres.py")]
    url = subprocess.run([*tool, "create"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        code = f"from repair.records import open_storage; open_storage({url!r})"
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for proc in procs:
            assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
    finally:
        subprocess.run([*tool, "drop", url], check=True)


def test_opening_a_study_retries_a_commit_lost_to_another_process(tmp_path, monkeypatch):
    """A worker once failed its start because its commit lost to the coordinator's on a fresh PostgreSQL
    study (Optuna's StorageInternalError); opening again finds the study the winner made."""
    import optuna

    from repair.records import open_study

    calls = []
    create = optuna.create_study

    def lose_once(**kwargs):
        calls.append(kwargs["study_name"])
        if len(calls) == 1:
            create(**kwargs)  # the winner's study is there; this process's commit is the one that failed
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
        return create(**kwargs)

    monkeypatch.setattr(optuna, "create_study", lose_once)
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "raced")
    assert calls == ["raced", "raced"] and study.study_name == "raced"
    monkeypatch.setattr(optuna, "create_study", lambda **kw: (_ for _ in ()).throw(
        optuna.exceptions.StorageInternalError("An exception is raised during the commit.")))
    with pytest.raises(UserError, match="cannot open the study storage .* An exception is raised during the commit"):
        open_study(f"sqlite:///{tmp_path / 'other.db'}", "never", attempts=2)


def test_a_worker_polling_for_its_run_holds_one_connection_pool():
    """A worker polls for a run its coordinator has not started yet; each poll once opened a new
    connection pool and kept its connection, until PostgreSQL refused clients past max_connections."""
    import psycopg

    from repair.records import NoSuchStudy, open_study

    name = f"polling-{os.getpid()}"  # this process's connections, told apart from the other tests'
    url = f"{PG}?application_name={name}"
    for _ in range(12):
        with pytest.raises(NoSuchStudy):
            open_study(url, "not-started-yet", create=False)
    with psycopg.connect(PG, autocommit=True) as conn:
        held = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)).fetchone()[0]
    assert 1 <= held <= 2, f"{held} connections held after 12 polls"
