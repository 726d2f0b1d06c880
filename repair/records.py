"""Evaluation records in an Optuna study: one trial per evaluated configuration.

The study lives in any Optuna RDB storage (a SQLite file in the run directory by default,
PostgreSQL for many workers). A configuration counts as stored only once its trial is COMPLETE, so a
crash mid-evaluation loses nothing and duplicates nothing: the rerun evaluates it again.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import optuna

from repair.errors import UserError, one_line

optuna.logging.set_verbosity(optuna.logging.WARNING)


def redact(url: str) -> str:
    """The storage URL with any password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_study(storage: str, name: str) -> optuna.Study:
    try:
        return optuna.create_study(
            storage=storage, study_name=name, directions=["minimize", "minimize"], load_if_exists=True
        )
    except Exception as exc:
        raise UserError(f"cannot open the study storage {redact(storage)}: {one_line(exc)[:200]} "
                        "(check --storage; the default is a SQLite file in the output directory)") from None


class Records:
    """Configurations keyed by text (a mask key), each evaluated at most once to completion."""

    def __init__(self, study: optuna.Study):
        self.study = study

    def completed(self) -> dict[str, optuna.trial.FrozenTrial]:
        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return {t.user_attrs["key"]: t for t in done}

    def fail_stale(self) -> int:
        """Mark RUNNING trials left by a killed single-process run as FAIL, so they are redone."""
        stale = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for t in stale:
            self.study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        return len(stale)

    def evaluate(
        self,
        items: Sequence[tuple[str, str]],
        evaluate_batch: Callable[[list[str]], list[dict]],
        *,
        batch_size: int,
        progress=None,
    ) -> dict[str, optuna.trial.FrozenTrial]:
        """Evaluate every (key, phase) not yet stored, `batch_size` at a time; return all stored."""
        done = self.completed()
        todo, seen = [], set(done)
        for key, phase in items:
            if key not in seen:
                todo.append((key, phase))
                seen.add(key)
        if progress is not None:
            progress.update(len(items) - len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            trials = []
            for key, phase in chunk:
                trial = self.study.ask()
                trial.set_user_attr("key", key)
                trial.set_user_attr("phase", phase)
                trials.append(trial)
            began = time.perf_counter()
            rows = evaluate_batch([k for k, _ in chunk])
            seconds = (time.perf_counter() - began) / len(chunk)
            for trial, row in zip(trials, rows):
                trial.set_user_attr("metrics", row["metrics"])
                trial.set_user_attr("fairness", row["fairness"])
                trial.set_user_attr("utility", row["utility"])
                trial.set_user_attr("seconds", round(seconds, 3))
                self.study.tell(trial, [row["fairness"], row["utility_loss"]])
            if progress is not None:
                progress.update(len(chunk))
        return self.completed()
