"""`repair worker`: join a run's study from any machine and evaluate the configurations it waits for.

The coordinator (`repair run`) stores its configuration and its data files' hashes in the study; a
worker loads the same model and suites from them, claims WAITING trials of the run's two studies
(search split, then the held-out select and report splits), evaluates them in batches and completes them, until
the coordinator marks the run finished or nothing arrives for `max_idle` seconds.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from repair.errors import UserError
from repair.models import ModelSpec, load_model, model_numbers
from repair.objectives import Objectives
from repair.records import NoSuchStudy, Records, open_study, redact
from repair.rundir import RECORDS, RunConfig, check_numbers, pop_options, unset_defaults


@dataclass(frozen=True)
class WorkerConfig:
    storage: str
    study: str
    model: str | None = None  # this machine's copy of the run's model, when its path differs
    data_dir: Path | None = None  # this machine's copy of the run's data, when its path differs
    device: str = "auto"
    device_map: str | None = None
    batch_masks: int = 8
    poll: float = 1.0
    max_idle: float = 600.0


def run_config_from_study(study, worker: WorkerConfig) -> RunConfig:
    """The run's configuration with this machine's paths and device; refused (before any loading) when
    its model would compute other numbers than the run's: other weights, device type or dtype."""
    stored = study.user_attrs.get("run")
    if not stored:
        raise UserError(f"study {worker.study!r} holds no repair run (start it with `repair run --storage ... --study {worker.study}`)")
    identity = dict(stored["identity"])
    numbers = identity.pop("numbers", None)
    if identity.pop("records", None) != RECORDS:
        raise UserError(f"study {worker.study!r} was made by another version of fairness-repair (its records are "
                        "keyed differently): run the worker with the run's version")
    model = {**identity.pop("model"), "device": worker.device, "device_map": worker.device_map}
    if numbers:
        model["dtype"] = numbers["dtype"]  # the run's, as it resolved there
    if worker.model:
        model["model"] = worker.model
    spec = ModelSpec(**model)
    check_numbers(numbers, model_numbers(spec) if numbers else {}, f"study {worker.study!r}", "worker",
                  f"point --model at a copy of the run's model, with --device {(numbers or {}).get('device')}",
                  "restart the run with this version of fairness-repair")
    data_dir = worker.data_dir or stored["data_dir"]
    identity["baselines"] = tuple(identity["baselines"])
    unset = identity.pop("unset", {})
    options = pop_options(identity)
    ours = unset_defaults(options)
    if unset != ours:
        raise UserError(f"study {worker.study!r} was made when unset flags meant {unset}; this version of fairness-repair "
                        f"means {ours}: run the worker with the run's version")
    return RunConfig(out=Path("."), model=spec, data_dir=Path(data_dir) if data_dir else None, options=options,
                     heartbeat=stored["heartbeat"], **{k: v for k, v in identity.items() if k != "data_dir"})


def _wait_for_run(worker: WorkerConfig):
    """The run's study, once its coordinator has published it: workers may start first on a cluster."""
    deadline = time.monotonic() + worker.max_idle
    while True:
        try:
            study = open_study(worker.storage, worker.study, create=False)
            if "run" in study.user_attrs or time.monotonic() > deadline:
                return study
        except NoSuchStudy:
            if time.monotonic() > deadline:
                raise
        time.sleep(worker.poll)


def run_worker(worker: WorkerConfig) -> int:
    from repair.methods import build
    from repair.runloop import SPLITS, Scorer, eval_config

    config = run_config_from_study(_wait_for_run(worker), worker)
    search_study = open_study(worker.storage, worker.study, config.heartbeat, create=False)  # beat as the run expects
    objectives = Objectives.parse(config.fairness, config.utility)
    loaded = load_model(config.model)
    methods = build(config, loaded.model)  # every method of the run: workers take evaluations of any of them
    for method in methods.values():
        method.load_artifacts(search_study.user_attrs)  # e.g. FairMed's probers: the run's, not fitted again here
    scorer = Scorer(loaded, objectives, {split: eval_config(config, split) for split in SPLITS}, methods,
                    config.panel_bbq_limit)
    try:
        if sorted(scorer.files().values()) != search_study.user_attrs["run"]["data_sha256"]:
            raise UserError("this worker's data files differ from the run's (their sha256 do not match): "
                            "point --data-dir at the same copy of the data the run uses")
        queues = [
            (Records(search_study), scorer.scorer("search"), "sampling"),
            *((Records(open_study(worker.storage, f"{worker.study}-{split}", config.heartbeat)), scorer.scorer(split), "verification")
              for split in ("select", "report")),
        ]
        print(f"worker: joined study {worker.study!r} in {redact(worker.storage)}", file=sys.stderr)
        n, idle_since = 0, time.monotonic()
        with tqdm(desc="worker: evaluated", unit="config", dynamic_ncols=True) as bar:
            while True:
                for records, score, stage in queues:
                    claimed = records.claim(scorer.batch_size(worker.batch_masks))
                    if claimed:
                        stored = records.work(claimed, score, stage)
                        n += stored
                        bar.update(stored)
                        idle_since = time.monotonic()
                        break
                else:
                    if search_study.user_attrs.get("finished"):  # read from the storage each time
                        break
                    if time.monotonic() - idle_since > worker.max_idle:
                        print(f"worker: nothing to evaluate for {worker.max_idle:.0f} s, leaving", file=sys.stderr)
                        break
                    time.sleep(worker.poll)
    finally:
        scorer.close()
    print(f"worker: evaluated {n} configurations")
    return 0

