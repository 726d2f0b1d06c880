"""Evaluation records in an Optuna study: one trial per evaluated configuration, and the work queue.

The study lives in any Optuna RDB storage (a SQLite file in the run directory by default,
PostgreSQL for many workers). The coordinator enqueues the configurations it wants as WAITING
trials (`Study.enqueue_trial`); whoever evaluates (the coordinator itself, or `repair worker`
processes on other machines) claims WAITING trials through the storage's own atomic
WAITING -> RUNNING transition, beats Optuna's heartbeat while it works, and completes them. So the
study is the only queue. A configuration counts as stored only once its trial is COMPLETE: a
process killed mid-evaluation leaves a RUNNING trial whose heartbeat goes stale; the coordinator
marks it FAIL and enqueues the configuration again, and a FAILed trial can never complete, so
nothing is lost and nothing counts twice.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState

from repair import failpoints
from repair.errors import UserError, one_line

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_SECONDS = 10
OWNER = f"{socket.gethostname()}:{os.getpid()}"


class NoSuchStudy(UserError):
    """The storage answers but holds no study of that name (yet)."""


def redact(url: str) -> str:
    """The storage URL with any password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


# what a process loses when it opens a fresh database or study together with others (table and row
# creation races; a commit that lost one, as Optuna reports it): opening again finds what the winner made
RACES = ("IntegrityError", "ProgrammingError", "StorageInternalError")


# one storage (one SQLAlchemy engine and its connection pool) per database server URL and heartbeat in a
# process: a worker polling for its run would otherwise open a new pool at each poll and hold its
# connections until garbage collection, and PostgreSQL refuses clients past max_connections (100 by
# default). SQLite files are opened afresh: a file deleted and made again must not be written through
# an old connection to the deleted one.
_OPEN: dict[tuple[str, int], optuna.storages.RDBStorage] = {}


def open_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS, attempts: int = 5) -> optuna.storages.RDBStorage:
    """An RDB storage whose RUNNING trials are stale after three missed heartbeats (a database server's
    opened once per process, see _OPEN). Processes that open a fresh database together race to create
    Optuna's tables; the losers retry and find them made."""
    if (url, heartbeat) in _OPEN:
        return _OPEN[url, heartbeat]
    try:
        rdb = _retrying_races(url, attempts, ImportError, lambda: optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat))
    except ImportError:
        raise UserError(f"no database driver for {redact(url)} (for PostgreSQL: pip install 'psycopg[binary]', "
                        "or install this package with its [postgres] extra)") from None
    return rdb if url.startswith("sqlite") else _OPEN.setdefault((url, heartbeat), rdb)


def open_study(storage: str, name: str, heartbeat: int = HEARTBEAT_SECONDS, *, create: bool = True,
               attempts: int = 5) -> optuna.Study:
    """The study `name` (created unless `create` is False), retried like `open_storage` when a process
    opening it at the same time wins a race."""
    rdb = open_storage(storage, heartbeat)

    def opened():
        if not create:
            return optuna.load_study(study_name=name, storage=rdb)
        return optuna.create_study(storage=rdb, study_name=name, directions=["minimize", "minimize"], load_if_exists=True)

    try:
        return _retrying_races(storage, attempts, KeyError, opened)
    except KeyError:
        raise NoSuchStudy(f"no study named {name!r} in {redact(storage)} (start `repair run --storage ... --study "
                          f"{name}` first, or check --study)") from None


def _retrying_races(url: str, attempts: int, passing: type[Exception], opening: Callable):
    """`opening()`, tried again after a lost race (RACES); a `passing` exception goes to the caller to
    name, any other failure (or the last lost race) is the one-line "cannot open" UserError."""
    for attempt in range(attempts):
        try:
            return opening()
        except passing:
            raise
        except Exception as exc:
            if type(exc).__name__ not in RACES or attempt == attempts - 1:
                raise _unreachable(url, exc) from None
            time.sleep(0.2)


def _unreachable(url: str, exc: BaseException) -> UserError:
    return UserError(f"cannot open the study storage {redact(url)}: {_strip(exc, url)} "
                     "(check --storage; the default is a SQLite file in the output directory)")


def _strip(exc: BaseException, url: str) -> str:
    """A driver's first error line, cut short, with the URL's password removed in case it was echoed."""
    text = one_line(exc)[:200]
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(password, "***") if password else text


class Records:
    """Configurations keyed by text (a mask key), each evaluated at most once to completion."""

    def __init__(self, study: optuna.Study):
        self.study = study
        # the RDB storage itself, under Optuna's in-process cache: claims and heartbeats go straight to the database
        self.storage: optuna.storages.RDBStorage = getattr(study._storage, "_backend", study._storage)
        self.heartbeat = self.storage.heartbeat_interval or HEARTBEAT_SECONDS

    # ---- reading ---------------------------------------------------------------------------
    def completed(self) -> dict[str, optuna.trial.FrozenTrial]:
        return {t.user_attrs["key"]: t for t in self._by_state(TrialState.COMPLETE)}

    def _by_state(self, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.storage.get_all_trials(self.study._study_id, deepcopy=False, states=states)

    # ---- coordinator -------------------------------------------------------------------------
    def enqueue(self, items: Sequence[tuple[str, str]]) -> list[str]:
        """Enqueue every (key, phase) that is neither stored nor already waiting or running."""
        present = {t.user_attrs["key"] for t in self._by_state(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
        added = []
        for key, phase in items:
            if key not in present:
                self.study.enqueue_trial({}, user_attrs={"key": key, "phase": phase})
                present.add(key)
                added.append(key)
        return added

    def fail_stale(self, *, local_dead: bool = False) -> int:
        """Mark FAIL the RUNNING trials whose heartbeat stopped (their process died). With
        `local_dead`, also those claimed by a process of this host that no longer exists, without
        waiting for the grace period (a rerun after a crash on one machine resumes at once)."""
        stale = set(self.storage._get_stale_trial_ids(self.study._study_id))
        if local_dead:
            host = socket.gethostname()
            for t in self._by_state(TrialState.RUNNING):
                owner_host, _, pid = str(t.user_attrs.get("owner", "")).rpartition(":")
                if owner_host == host and pid.isdigit() and not _alive(int(pid)):
                    stale.add(t._trial_id)
        return sum(self.storage.set_trial_state_values(tid, TrialState.FAIL) for tid in stale)

    # ---- anyone who evaluates -------------------------------------------------------------------
    def claim(self, n: int) -> list[optuna.trial.FrozenTrial]:
        """Take up to `n` WAITING trials, oldest first. The heartbeat is recorded before the
        WAITING -> RUNNING switch, so a claim can never be RUNNING without one; losing a race to
        another process just skips that trial."""
        got = []
        for t in self._by_state(TrialState.WAITING):
            self.storage.record_heartbeat(t._trial_id)
            try:
                won = self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
            except RuntimeError:  # finished meanwhile
                won = False
            if won:
                self.storage.set_trial_user_attr(t._trial_id, "owner", OWNER)
                got.append(t)
                if len(got) == n:
                    break
        return got

    def work(self, trials: list[optuna.trial.FrozenTrial], evaluate_batch: Callable[[list[str]], list[dict]],
             stage: str) -> int:
        """Evaluate claimed trials in one batch and complete them; returns how many were stored.
        A trial that was failed meanwhile (its heartbeat judged stale) is left as it is."""
        keys = [t.user_attrs["key"] for t in trials]
        try:
            with self._beating([t._trial_id for t in trials]):
                failpoints.reached(stage)
                began = time.perf_counter()
                rows = evaluate_batch(keys)
                seconds = (time.perf_counter() - began) / len(trials)
        except BaseException:
            for t in trials:  # give them back at once rather than after the grace period
                self._try(lambda: self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL))
            raise
        stored = 0
        for t, row in zip(trials, rows):
            stored += self._try(lambda: self._complete(t, row, seconds))
            failpoints.reached(stage)
        return stored

    def _complete(self, t, row: dict, seconds: float) -> bool:
        for name in ("metrics", "fairness", "utility", "units"):
            if name in row:
                self.storage.set_trial_user_attr(t._trial_id, name, row[name])
        self.storage.set_trial_user_attr(t._trial_id, "seconds", round(seconds, 3))
        return self.storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [row["fairness"], row["utility_loss"]])

    @staticmethod
    def _try(action) -> bool:
        try:
            return bool(action())
        except RuntimeError:  # optuna's UpdateFinishedTrialError: the trial was failed meanwhile
            return False

    @contextmanager
    def _beating(self, trial_ids: list[int]):
        stop = threading.Event()

        def beat():
            while not stop.wait(self.heartbeat):
                for tid in trial_ids:
                    self._try(lambda: self.storage.record_heartbeat(tid) or True)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def evaluate(
        self,
        items: Sequence[tuple[str, str]],
        evaluate_batch: Callable[[list[str]], list[dict]],
        *,
        batch_size: int,
        progress=None,
        work: bool = True,
        stage: str = "evaluation",
        poll: float = 0.5,
    ) -> dict[str, optuna.trial.FrozenTrial]:
        """Have every (key, phase) stored: enqueue the missing ones, evaluate them `batch_size` at a
        time (unless `work` is False: external workers do it), and wait for the rest; configurations
        whose evaluation died are enqueued again. Returns all stored."""
        wanted = list(dict.fromkeys(k for k, _ in items))
        shown = 0
        while True:
            done = self.completed()
            n_done = sum(k in done for k in wanted)
            if progress is not None:
                progress.update(n_done - shown)
                shown = n_done
            if n_done == len(wanted):
                return done
            self.fail_stale()
            self.enqueue([(k, p) for k, p in items if k not in done])
            claimed = self.claim(batch_size) if work else []
            if claimed:
                self.work(claimed, evaluate_batch, stage)
            else:
                time.sleep(poll)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
