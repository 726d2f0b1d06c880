"""The phases every method shares: seed, evaluate, fit, anneal, evaluate, verify on the select split,
choose, report on the report split.

1. the method's seed configurations (and the unrepaired model) are evaluated on the LLM (search split);
2. surrogate ensembles configuration features -> fairness and -> utility loss are fitted on the records;
3. annealing over the surrogates, for a sweep of trade-off weights (and each of the method's settings
   beyond its bits), inside a trust region around evaluated configurations; the most promising new
   ones are evaluated for real; refit; repeat for `rounds`;
4. the best configurations and the unrepaired model are verified on the held-out `select` split; the
   fairest one that keeps utility within the allowed loss there and passes the guards (`repair.guards`:
   kl_uniform does not rise, the neutral reference does not move) is chosen; only then are the
   unrepaired model, the chosen configuration, each method's best and the select split's front
   measured on the `report` split, which nothing ever chooses by.
Every LLM evaluation is a trial in an Optuna study keyed by method and configuration
(`repair.space`), so a killed run resumes where it stopped and `repair worker` processes on other
machines evaluate configurations of any method from the same study.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from repair import failpoints
from repair.errors import UserError
from repair.evaluator import Evaluator
from repair.guards import Q_SPREAD, Guards
from repair.io import write_json_atomic
from repair.methods.probe_pass import ProbePass
from repair.models import LoadedModel
from repair.objectives import ConfigEvaluator, Objectives, paired_changes
from repair.records import Records, open_study
from repair.rundir import RunConfig
from repair.space import BASE, STACK, method_of, parts, stack_key
from repair.suites.association import q_drift
from repair.suites.base import EvalConfig
from search import TrustRegion, pareto_front, sweep
from surrogate import ChecksumError, fit_surrogate, joint_predictor, load, save

SPLITS = ("search", "select", "report")
TRUST_RADIUS = 12  # bits from the nearest evaluated configuration that annealing may go
SWEEP_WEIGHTS = (3.0, 10.0, 30.0, 100.0)
KAPPA = 0.5  # pessimism: predicted mean + KAPPA x the ensemble's spread, for fairness and utility


def eval_config(config: RunConfig, split: str) -> EvalConfig:
    """The suites of one split; `select` and `report` both take the held-out limits (`report_limit`,
    `report_ppl_tokens`)."""
    search = split == "search"
    return EvalConfig(
        data_dir=config.data_dir, split=split,
        limit=config.search_limit if search else config.report_limit,
        bbq_mode=config.bbq_mode,
        # the neutral reference prompts only serve kl_neutral: skip them while searching unless it is the objective
        association_neutral=not search or "association-neutral" in config.fairness,
        ppl_tokens=config.search_ppl_tokens if search else config.report_ppl_tokens,
        seed=config.seed,
    )


def panel(report: EvalConfig, bbq_limit: int) -> dict[str, EvalConfig]:
    """The transfer panel's suites and their limits, never fitted on or chosen by: the pairs (every pair)
    and, where the data folder holds BBQ, `bbq_limit` report-split BBQ items per category."""
    out = {"pairs": replace(report, limit=None)}
    if report.data_dir is not None and (Path(report.data_dir) / "bbq").is_dir():
        out["bbq"] = replace(report, limit=bbq_limit, categories=None)
    return out


class Scorer:
    """Evaluates batches of configuration keys of any of `methods`, many per batched forward, on any
    split: each method's intervention gets, for every key of the batch, its configuration (the
    identity for keys of other methods and for `base`). An intervention that transforms the outputs
    (the experts) is the evaluator's transform: keys that differ only in its setting share a forward."""

    def __init__(self, loaded: LoadedModel, objectives: Objectives, splits: dict[str, EvalConfig], methods: dict,
                 panel_bbq_limit: int = 60):
        self.methods = methods
        self.hooks = {}
        try:
            for name, method in methods.items():
                self.hooks[name] = method.intervention(loaded.model)
            self.transform = next((h for h in self.hooks.values() if getattr(h, "transforms_outputs", False)), None)
            # a method that evaluates its whole grid in one batch (minutes on the held-out splits) shows the
            # evaluator's own bars, per suite, under the run's; short batches would only flicker
            long_batches = any(m.keys_per_batch for m in methods.values())
            self.evaluator = Evaluator(loaded.model, loaded.tokenizer, on_rows=self._set_rows, progress=long_batches,
                                       transform=self.transform, first_layer=self._first_layer)
            # the report split also scores the transfer panel (suites only shown), for every configuration it measures
            self.objectives = {split: ConfigEvaluator(objectives, cfg, loaded.tokenizer,
                                                      panel(cfg, panel_bbq_limit) if split == "report" else None)
                               for split, cfg in splits.items()}
        except BaseException:
            self.close()
            raise

    def _set_rows(self, rows, shared=None) -> None:
        for hook in self.hooks.values():
            if hook is not self.transform:
                hook.set_rows(rows, shared)

    def _first_layer(self, variants: list[int]) -> int | None:
        """The first decoder layer any of `variants` changes, over every method's part of them (None:
        they all leave the forward alone; the experts' transform never changes it): below it the
        evaluator runs each item once for all of them (repair.fanout)."""
        found = [hook.first_layer(variants) for hook in self.hooks.values() if hook is not self.transform]
        return min((f for f in found if f is not None), default=None)

    def batch_size(self, batch_masks: int, methods=None) -> int:
        """Keys per evaluation batch: --batch-masks, or what a method evaluates at once (the experts'
        grid), of `methods` (default: all of this scorer's)."""
        methods = self.methods.values() if methods is None else methods
        return max([batch_masks, *(m.keys_per_batch for m in methods)])

    def files(self) -> dict[str, str]:
        """Data file -> sha256 of every suite read, to check that workers read the same data."""
        return {f: h for ev in self.objectives.values() for s in ev.suites.values() for f, h in (getattr(s, "files", {}) or {}).items()}

    def set_keys(self, keys: list[str]) -> None:
        """Each intervention's setting for every key: its own part of the key (a stack has several), else
        the identity."""
        found = [parts(k) for k in keys]
        for name, hook in self.hooks.items():
            space = self.methods[name].space
            hook.set_variants([space.config(p.get(name, BASE)) for p in found])
        if self.transform is not None:  # a key shares the forward of the first key equal to it but for the transform
            transformed = next(n for n, h in self.hooks.items() if h is self.transform)
            rest = [sorted((m, k) for m, k in p.items() if m != transformed) for p in found]
            self.transform.forward_of = [rest.index(r) for r in rest]

    def scorer(self, split: str):
        """Evaluates a batch of keys on `split`; held-out evaluations keep the per-unit numbers that
        paired intervals of their changes need."""
        def score(keys: list[str]) -> list[dict]:
            unknown = sorted({m for k in keys for m in parts(k)} - set(self.methods))
            if unknown:
                raise UserError(f"the study holds configurations of method {unknown[0]!r}, which this process was "
                                "not started for (start the worker for the run's own --method)")
            self.set_keys(keys)
            return self.objectives[split].evaluate(self.evaluator, len(keys), keep_units=split != "search")
        return score

    def close(self) -> None:
        for hook in self.hooks.values():
            hook.remove()


def progress_bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="config", dynamic_ncols=True)


def evaluate_search(config: RunConfig, scorer: Scorer, records: Records, items: list[tuple[str, str]], desc: str,
                    methods=None) -> list[str]:
    """Evaluate (key, phase) pairs not yet stored on the search split, in batches sized for `methods`
    (default: all the scorer's); return the keys in order."""
    with progress_bar(len(items), desc) as bar:
        records.evaluate(items, scorer.scorer("search"), batch_size=scorer.batch_size(config.batch_masks, methods), progress=bar,
                         work=not config.workers_only, stage="sampling")
    return [k for k, _ in items]


TARGET_DIGITS = 4  # significant digits of the objectives the surrogates are fitted to


def _reproducible(values: np.ndarray) -> np.ndarray:
    """`values` rounded to TARGET_DIGITS significant digits. A configuration evaluated in another batch
    (after a crash, or by another worker) scores the same to about 1e-7 relative, not bit for bit; fed
    raw, that noise could steer a refit surrogate's annealing to other candidates."""
    finite = np.isfinite(values) & (values != 0)
    safe = np.where(finite, values, 1.0)
    scale = 10.0 ** (TARGET_DIGITS - 1 - np.floor(np.log10(np.abs(safe))))
    return np.where(finite, np.round(safe * scale) / scale, values)


@dataclass(frozen=True)
class RoundFit:
    """A round's surrogates and what they were fitted on: the method's evaluated keys, their features
    and objectives (rounded: `_reproducible`), the round's seed, and the fit's record (files, sha256, scores)."""

    keys: list[str]
    X: np.ndarray
    fairness: np.ndarray
    utility: np.ndarray
    seed: int
    fairness_model: Any
    utility_model: Any
    record: dict


class Search:
    """One method's search over a loaded model; every phase resumes from the stored records."""

    def __init__(self, config: RunConfig, objectives: Objectives, scorer: Scorer, method, records: Records):
        self.config, self.objectives, self.scorer, self.method = config, objectives, scorer, method
        self.space = method.space
        self.records = records
        self.folder = method.surrogates_folder(config.out)
        self.fits: list[dict] = []

    def evaluate(self, items: list[tuple[str, str]], desc: str) -> list[str]:
        """Evaluate (key, phase) pairs not yet stored; return the keys in order (the method's sequence)."""
        return evaluate_search(self.config, self.scorer, self.records, items, desc, [self.method])

    # ---- surrogates and annealing, in rounds -----------------------------------------------
    def training_data(self, before_round: int | None = None):
        """This method's stored configurations (and the unrepaired model) with their objectives (fairness
        as the guards leave it: `Guards.guarded`), sorted by key (not by when each was evaluated, so a
        resumed or distributed run sees the same rows). With `before_round`, only what the search itself
        had evaluated before that round (no baseline's evaluations)."""
        done = self.records.completed()
        phases = {"base", *self.method.seed_phases} | {f"round-{j}" for j in range(1, before_round or 0)}
        keys = sorted(k for k, t in done.items() if method_of(k) in (None, self.method.name)
                      and (before_round is None or t.user_attrs["phase"] in phases))
        X = np.stack([self.space.features(k) for k in keys]).astype(np.float64)
        # the guards, from point values: a configuration past them is worth no more than the unrepaired model
        base, guards = done[BASE], guards_of(self.config)
        f = np.array([guards.guarded(done[k].values[0], base.values[0], base.user_attrs["metrics"], done[k].user_attrs["metrics"])
                      for k in keys])
        u = np.array([done[k].values[1] for k in keys])
        return keys, X, _reproducible(f), _reproducible(u)

    def base_trial(self):
        return self.records.completed()[BASE]

    def utility_limit_loss(self) -> float:
        """The largest utility loss (search split) that still meets the constraint."""
        base_utility = self.base_trial().user_attrs["utility"]
        bound = self.objectives.utility_bound(base_utility, self.config.max_utility_loss)
        return self.objectives.utility_loss(bound)

    def round(self, r: int) -> list[str]:
        """Fit, anneal, evaluate the candidates. Each step's result is on disk before the next
        starts (fitted surrogates with their checksums, then the plan), so a rerun after a crash
        continues from the last finished step with the same numbers."""
        every = self.method.every_configuration()
        if every is not None and set(every) <= set(self.records.completed()):
            return []  # every configuration is evaluated: nothing for surrogates to choose (the experts' grid)
        plan_path = self.folder / f"round-{r}.json"
        if plan_path.is_file():
            plan = json.loads(plan_path.read_text())
        else:
            plan = self._plan(r, plan_path, self._fit(r))
        self.fits.append(plan["fits"])
        return self.evaluate([(k, f"round-{r}") for k in plan["candidates"]], f"round {r}/{self.config.rounds}: evaluating candidates")

    def _fit(self, r: int) -> RoundFit:
        """The round's surrogates: fitted now, or read back (checksum-verified) from an earlier attempt."""
        folder = self.folder
        fit_path = folder / f"fit-{r}.json"
        keys, X, f, u = self.training_data(before_round=r)
        seed = self.config.seed * 1000 + r
        if fit_path.is_file():
            fit = json.loads(fit_path.read_text())
            if fit["keys"] == keys:
                try:
                    models = [load(folder / fit["files"][o], fit["sha256"][o], inside=self.config.out) for o in ("fairness", "utility")]
                except (ChecksumError, OSError) as exc:
                    raise UserError(f"{exc} (delete {fit_path} to refit the surrogates)") from None
                return RoundFit(keys, X, f, u, seed, *models, fit)
        f_params, u_params = self.method.surrogate_params(self)
        with tqdm(total=2, desc=f"round {r}/{self.config.rounds}: fitting surrogates", unit="model") as bar:
            f_model, f_scores = fit_surrogate(X, f, seed=seed, select_by="spearman", **f_params)
            bar.update(1)
            failpoints.reached("fitting")
            u_model, u_scores = fit_surrogate(X, u, seed=seed + 1, select_by="r2", **u_params)
            bar.update(1)
        folder.mkdir(parents=True, exist_ok=True)
        files = {o: f"round-{r}-{o}.joblib" for o in ("fairness", "utility")}
        digests = {"fairness": save(f_model, folder / files["fairness"])}
        failpoints.reached("fitting")
        digests["utility"] = save(u_model, folder / files["utility"])
        failpoints.reached("fitting")
        fit = {"keys": keys, "files": files, "sha256": digests,
               "scores": {"fairness": f_scores.as_dict(), "utility": u_scores.as_dict()}}
        write_json_atomic(fit_path, fit)
        return RoundFit(keys, X, f, u, seed, f_model, u_model, fit)

    def _plan(self, r: int, plan_path: Path, fit: RoundFit) -> dict:
        """The round's candidates, by the surrogates (annealed, or every configuration scored), kept in plan_path."""
        cfg, space = self.config, self.space
        keys, X, f, u, seed = fit.keys, fit.X, fit.fairness, fit.utility, fit.seed
        failpoints.reached("annealing")
        predict = joint_predictor(fit.fairness_model, fit.utility_model)
        n = space.n_bits
        bits, settings = X[:, :n].astype(bool), [space.setting(k) if k != BASE else None for k in keys]
        every = self.method.every_configuration()
        if every is not None:  # small enough to score every configuration: exact, no annealing
            found_keys = every
            fm, fs, um, us = predict(np.stack([space.features(k) for k in found_keys]))
            feasible = um + KAPPA * us <= self.utility_limit_loss()
            scores = list(np.where(feasible, fm + KAPPA * fs, np.inf).astype(np.float32))
            failpoints.reached("annealing")
        else:
            found_keys, scores = self._sweeps(r, predict, bits, settings, keys, f, seed)
        evaluated = set(keys)
        chosen = []
        for i in sorted(range(len(found_keys)), key=lambda i: (scores[i], found_keys[i])):
            if found_keys[i] not in evaluated and found_keys[i] not in chosen and np.isfinite(scores[i]):
                chosen.append(found_keys[i])
            if len(chosen) == cfg.per_round:
                break
        scores = fit.record["scores"]
        holdout_pred = {
            "fairness": {"scores": scores["fairness"], **_holdout_points(fit.fairness_model, X, f, seed)},
            "utility": {"scores": scores["utility"], **_holdout_points(fit.utility_model, X, u, seed + 1)},
        }
        plan = {"round": r, "candidates": chosen, "fits": holdout_pred, "surrogate_sha256": fit.record["sha256"],
                "n_records": len(keys), "selected_params": {o: {k: v for k, v in m.selected_params_.items() if k != "prior"}
                                    for o, m in (("fairness", fit.fairness_model), ("utility", fit.utility_model))}}
        write_json_atomic(plan_path, plan)
        return plan

    def _sweeps(self, r: int, predict, bits, settings, keys, f, seed) -> tuple[list[str], list]:
        """Annealing sweeps over the trade-off weights, for each setting the method anneals: the keys
        found and their scores (predicted fairness + KAPPA x spread; inf where infeasible)."""
        cfg, space, n = self.config, self.space, self.space.n_bits
        anneal_settings = self.method.anneal_settings(self, keys, f)
        chains, steps = self.method.anneal_size
        found_keys, scores = [], []
        with tqdm(total=len(SWEEP_WEIGHTS) * len(anneal_settings), desc=f"round {r}/{cfg.rounds}: annealing", unit="sweep") as bar:
            for j, setting in enumerate(anneal_settings):
                extra = space.setting_features(setting)
                same = [i for i, s in enumerate(settings) if s == setting or s is None]
                order = sorted(same, key=lambda i: f[i])  # start from the fairest evaluated configurations
                found = sweep(
                    _with_features(predict, extra), n, weights=SWEEP_WEIGHTS, seed=seed + 7 * j, include_final=False,
                    n_chains=chains, n_steps=steps, flips=min(3, n), constraint=self.utility_limit_loss(), kappa=KAPPA,
                    max_changed=space.max_changed, trust=TrustRegion(bits, TRUST_RADIUS),
                    start=bits[np.array(order)[np.arange(chains) % len(order)]],
                    callback=lambda: (bar.update(1), failpoints.reached("annealing")),
                )
                # rank in float32 with the key as tie-break: configurations whose predictions differ only by float
                # noise (e.g. in bits the surrogate ignores) must come out in the same order on every rerun and machine
                scores += list(np.where(found.feasible, found.fairness + KAPPA * found.fairness_std, np.inf).astype(np.float32))
                found_keys += [space.key(m, setting) for m in found.configs]
        return found_keys, scores

    # ---- verification on the held-out split ---------------------------------------------------
    def finalists(self, sequence: list[str] | None = None, top: int | None = None) -> list[str]:
        """Configurations worth verifying, at most `top` (default --verify-top): the search split's
        front within the utility limit, fairest first (among the keys of `sequence` when given: one
        method's evaluations)."""
        keys, X, f, u = self.training_data()
        if sequence is not None:
            wanted = set(sequence)
            pick = np.array([k in wanted for k in keys])
            keys, f, u = [k for k, p in zip(keys, pick) if p], f[pick], u[pick]
        ok = u <= self.utility_limit_loss()
        idx = np.nonzero(ok)[0]
        front = idx[pareto_front(np.c_[f[idx], u[idx]], ("min", "min"))] if len(idx) else idx
        ranked = list(front[np.argsort(f[front])]) + [i for i in idx[np.argsort(f[idx])] if i not in set(front)]
        out = [keys[i] for i in ranked if keys[i] != BASE]
        return out[: top or self.config.verify_top]


def _with_features(predict, extra: np.ndarray):
    """`predict` on bits followed by a fixed setting's features (nothing to add for a bits-only space)."""
    if not len(extra):
        return predict
    return lambda bits: predict(np.hstack([bits, np.broadcast_to(extra.astype(np.float32), (len(bits), len(extra)))]))


def _holdout_points(model, X, y, seed):
    """Predicted vs measured on the surrogate's held-out fifth, for the report's fit plots."""
    from surrogate.fit import split_holdout

    _, ho = split_holdout(len(y), 0.2, seed)
    return {"predicted": model.predict(X[ho]).tolist(), "measured": y[ho].tolist()}


def verify(config: RunConfig, scorer: Scorer, keys: list[str], split: str) -> dict[str, dict]:
    """Evaluate `keys` on a held-out split (`select` or `report`), resumably, in that split's study."""
    records = Records(open_study(config.storage_url, f"{config.study_name}-{split}", config.heartbeat))
    records.fail_stale(local_dead=True)
    desc = "verifying finalists on the select split" if split == "select" else "measuring on the report split"
    with progress_bar(len(keys), desc) as bar:
        done = records.evaluate([(k, split) for k in keys], scorer.scorer(split), batch_size=scorer.batch_size(config.batch_masks),
                                progress=bar, work=not config.workers_only, stage="verification")
    return {k: {a: done[k].user_attrs.get(a) for a in ("fairness", "utility", "metrics", "units")} for k in keys}


def guards_of(config: RunConfig) -> Guards:
    return Guards(config.max_kl_uniform_rise, config.max_q_drift)


def exclusions(config: RunConfig, objectives: Objectives, selected: dict[str, dict], base_key: str) -> dict[str, list[str]]:
    """Each verified configuration's failed guards on the select split (utility bound included); []
    for those that may be chosen."""
    guards, base = guards_of(config), selected[base_key]
    return {k: guards.failures(objectives, base, row, config.max_utility_loss, seed=config.seed) if k != base_key else []
            for k, row in selected.items()}


def choose(selected: dict[str, dict], base_key: str, allowed: list[str], excluded: dict[str, list[str]]) -> str:
    """The fairest of `allowed` that passes every guard on the select split (`exclusions`); the
    unrepaired model when none does. Reads select-split records only."""
    eligible = [k for k in allowed if k in selected and k != base_key and not excluded[k]]
    return min(eligible, key=lambda k: (selected[k]["fairness"], k)) if eligible else base_key


def select_front(objectives: Objectives, selected: dict[str, dict]) -> list[str]:
    """The verified configurations that no other beats on both objectives on the select split."""
    keys = list(selected)
    points = np.array([[selected[k]["fairness"], objectives.utility_loss(selected[k]["utility"])] for k in keys])
    return [keys[i] for i in pareto_front(points, ("min", "min"))]


def publish(study, config: RunConfig, files: dict[str, str], artifacts: dict) -> None:
    """Store what a `repair worker` needs to evaluate for this run: the configuration, the data's
    hashes and the methods' fitted artifacts (e.g. FairMed's probers)."""
    study.set_user_attr("run", {"identity": config.identity(), "data_dir": str(config.data_dir) if config.data_dir else None,
                                "heartbeat": config.heartbeat, "data_sha256": sorted(files.values())})
    for name, value in artifacts.items():
        study.set_user_attr(f"artifact:{name}", value)
    study.set_user_attr("finished", False)


class Timing:
    """Wall seconds spent per method (fitting and its search-split evaluations) and on the shared
    held-out evaluations, summed over every attempt of a resumed run (RUN_DIR/timing.json)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            write_json_atomic(self.path, self.seconds)


@dataclass(frozen=True)
class Searched:
    """What the search phase leaves: every sequence of keys (each method's, its built-in comparisons',
    its baselines'), the method each belongs to (None: the stacks), each one's finalists for the select
    split, and the surrogates' held-out fits."""

    sequences: dict[str, list[str]]
    owner: dict[str, str | None]
    finalists: dict[str, list[str]]
    fits: list[dict]


@dataclass(frozen=True)
class Selected:
    """The select split's verdict: the keys verified there in order (the unrepaired model first), their
    measurements, the guards each failed, each sequence's best (the unrepaired model when none
    passes) and the one chosen."""

    keys: list[str]
    measured: dict[str, dict]
    excluded: dict[str, list[str]]
    best: dict[str, str]
    chosen: str


@dataclass(frozen=True)
class RunResult:
    """A finished search: the candidates as candidates.jsonl holds them (the unrepaired model first),
    the surrogates' fits, how many LLM evaluations the study holds, the search-vs-select rank
    correlation, the wall time and where it went, and the sequences of keys."""

    candidates: list[dict]
    fits: list[dict]
    n_evaluations: int
    search_select_spearman: dict
    seconds: float
    timing: dict[str, float]
    sequences: dict[str, list[str]]


def run_search(config: RunConfig, loaded: LoadedModel, objectives: Objectives, methods: dict) -> RunResult:
    """Search each of `methods` (name -> method, each with its own share of the budget in
    `method.config`), then verify, choose and report over all of them together.

    One method keeps its built-in comparisons (top-k, layer sweep, baselines) as sequences of their
    own; several are ranked against each other instead, and with `config.stack` the best of each pair
    of methods is also evaluated applied together (a stack) and ranked with them."""
    started = time.perf_counter()
    records = Records(open_study(config.storage_url, config.study_name, config.heartbeat))
    records.fail_stale(local_dead=True)
    timing = Timing(config.out / "timing.json")
    search_split = eval_config(config, "search")
    probes = ProbePass(loaded, search_split, {site: modules for m in methods.values()
                                              for site, modules in m.probe_sites(loaded.model).items()}, config.out)
    for name, method in methods.items():
        with timing(name):  # the shared probe pass is timed with the first method that asks for it
            method.prepare(loaded, method.config, eval_config(method.config, "search"), probes)
    scorer = Scorer(loaded, objectives, {split: eval_config(config, split) for split in SPLITS}, methods, config.panel_bbq_limit)
    try:
        searched = search_methods(config, objectives, scorer, methods, records, timing)
        selected = select(config, objectives, scorer, searched, timing)
        if len(methods) > 1 and config.stack:
            searched, selected = add_stacks(config, objectives, scorer, methods, records, searched, selected, timing)
        # only now, after every choice, the report split: what the user is shown (every stack, so the report
        # shows whether stacking beats its parts)
        with timing("held-out"):
            to_report = list(dict.fromkeys([BASE, selected.chosen, *selected.best.values(),
                                            *searched.finalists.get(STACK, []), *select_front(objectives, selected.measured)]))
            reported = verify(config, scorer, to_report, "report")
        records.study.set_user_attr("finished", True)  # workers may leave
    finally:
        scorer.close()
    candidates = candidate_rows(config, objectives, methods, records, searched, selected, reported)
    from repair.io import write_text_atomic

    write_text_atomic(config.out / "candidates.jsonl", "".join(json.dumps(c) + "\n" for c in candidates))
    write_json_atomic(config.out / "methods.json", {
        name: {"evaluations": len(seq), "best": best_verified(seq, candidates, name)} for name, seq in searched.sequences.items()
    })
    return RunResult(candidates=candidates, fits=searched.fits, n_evaluations=len(records.completed()),
                     search_select_spearman=search_select_correlation(candidates),
                     seconds=time.perf_counter() - started, timing=timing.seconds, sequences=searched.sequences)


def search_methods(config: RunConfig, objectives: Objectives, scorer: Scorer, methods: dict, records: Records,
                   timing: Timing) -> Searched:
    """Each method's seed and surrogate rounds on the search split (and, alone, its built-in comparisons
    and baselines), the study's artifacts published first for workers; then each sequence's finalists."""
    several = len(methods) > 1
    searches = {name: Search(m.config, objectives, scorer, m, records) for name, m in methods.items()}
    publish(records.study, config, scorer.files(), {k: v for m in methods.values() for k, v in m.artifacts().items()})
    sequences, owner = {}, {}
    for name, method in methods.items():
        search = searches[name]
        with timing(name):
            sequences[name] = search.evaluate(method.seed(search), method.seed_description
                                              + (f" ({name})" if several else ""))
            for r in range(1, method.config.rounds + 1):
                sequences[name] += search.round(r)
            own = method.baselines(search) if not several else {}
        owner[name] = name
        for seq_name, seq in own.items():
            sequences[seq_name], owner[seq_name] = seq, name
    # the built-in comparisons (top-k, layer-sweep, always-on) need only their best few verified: half as
    # many finalists (a held-out evaluation costs about ten search-split ones); --baselines all of theirs
    finalists = {seq_name: searches[owner[seq_name]].finalists(
                     seq, None if seq_name in methods or seq_name in config.baselines
                     else max(1, methods[owner[seq_name]].config.verify_top // 2))
                 for seq_name, seq in sequences.items()}
    return Searched(sequences, owner, finalists, [f for s in searches.values() for f in s.fits])


def select(config: RunConfig, objectives: Objectives, scorer: Scorer, searched: Searched, timing: Timing) -> Selected:
    """The finalists measured on the select split; the guards' exclusions; each sequence's best and the
    one chosen among the methods' own sequences (not their comparisons' or baselines')."""
    with timing("held-out"):
        keys = list(dict.fromkeys([BASE] + [k for found in searched.finalists.values() for k in found]))
        measured = verify(config, scorer, keys, "select")
    return _verdict(config, objectives, searched, keys, measured)


def add_stacks(config: RunConfig, objectives: Objectives, scorer: Scorer, methods: dict, records: Records,
               searched: Searched, selected: Selected, timing: Timing) -> tuple[Searched, Selected]:
    """Each pair of methods' best applied together: evaluated on the search split, verified on the
    select split, and ranked with the rest (the choice made again over all of them)."""
    stacks = stack_candidates(selected.best, methods)
    with timing(STACK):
        evaluate_search(config, scorer, records, [(k, STACK) for k in stacks], "stacks: best configurations in pairs")
    with timing("held-out"):
        measured = {**selected.measured, **verify(config, scorer, stacks, "select")}
    searched = replace(searched, sequences={**searched.sequences, STACK: [BASE, *stacks]},
                       owner={**searched.owner, STACK: None}, finalists={**searched.finalists, STACK: stacks})
    return searched, _verdict(config, objectives, searched, selected.keys + stacks, measured)


def _verdict(config: RunConfig, objectives: Objectives, searched: Searched, keys: list[str], measured: dict) -> Selected:
    excluded = exclusions(config, objectives, measured, BASE)
    best = {m: choose(measured, BASE, found, excluded) for m, found in searched.finalists.items()}
    allowed = [k for seq, found in searched.finalists.items() if searched.owner[seq] in (seq, None) for k in found]
    return Selected(keys, measured, excluded, best, choose(measured, BASE, allowed, excluded))


def candidate_rows(config: RunConfig, objectives: Objectives, methods: dict, records: Records, searched: Searched,
                   selected: Selected, reported: dict) -> list[dict]:
    """One row per configuration verified on the select split (the unrepaired model first), as
    candidates.jsonl holds it: what it is, which sequences it finalised and led, the guards, its
    numbers on every split and its paired changes against the unrepaired model."""
    done = records.completed()
    measured = {"select": selected.measured, "report": reported}
    bound = objectives.utility_bound(selected.measured[BASE]["utility"], config.max_utility_loss)
    return [{
        "key": k, "phase": done[k].user_attrs["phase"], "method": method_of(k) or "base", "config": describe(methods, k),
        "methods": [m for m, found in searched.finalists.items() if k in found], "chosen": k == selected.chosen,
        "best_of": [m for m, b in selected.best.items() if b == k and k != BASE],
        "meets_constraint_on_select": objectives.meets(selected.measured[k]["utility"], bound),
        "excluded_by": selected.excluded[k],  # the guards it failed on the select split (utility included); [] if eligible
        # how far the neutral reference moved, KL(q || q_base), on each held-out split, and the unrepaired model's own spread
        "q_drift": {split: {"value": q_drift(rows[BASE]["metrics"], rows[k]["metrics"]),
                            "spread": (rows[BASE]["metrics"].get(Q_SPREAD) or {}).get("value")} if k in rows else None
                    for split, rows in measured.items()},
        "search": _numbers(done[k].user_attrs),
        **{split: _numbers(rows[k]) if k in rows else None for split, rows in measured.items()},
        # against the unrepaired model on the same split, with paired intervals
        "changes": {split: paired_changes(objectives, rows[BASE], rows[k], seed=config.seed) if k in rows and k != BASE else None
                    for split, rows in measured.items()},
    } for k in selected.keys]


def search_select_correlation(candidates: list[dict]) -> dict:
    """Spearman's rank correlation between the search-split and the select-split fairness of the
    verified configurations (the unrepaired model included): whether the search's ranking holds on
    concepts and frames it never saw. NaN with fewer than 3."""
    from scipy.stats import spearmanr

    pairs = [(c["search"]["fairness"], c["select"]["fairness"]) for c in candidates if c.get("select")]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return {"spearman": float("nan"), "n": len(pairs)}
    rho = spearmanr(*zip(*pairs)).statistic
    return {"spearman": float(rho), "n": len(pairs)}


def bests_of(candidates: list[dict]) -> dict[str, dict]:
    """Each sequence's best candidate (a method's, the stacks', a baseline's), by sequence name."""
    return {name: c for c in candidates for name in c["best_of"]}


def stack_candidates(best: dict[str, str], methods: dict) -> list[str]:
    """Every pair of methods whose best configuration on the select split is a repair (not the
    unrepaired model), applied together."""
    repaired = [best[m] for m in methods if best.get(m, BASE) != BASE]
    return [stack_key((a, b), methods) for a, b in combinations(repaired, 2)]


def describe(methods: dict, key: str) -> dict:
    """A configuration in the report's words: its method's description, or each part's for a stack."""
    if method_of(key) == STACK:
        return {"stack": {m: methods[m].space.describe(k) for m, k in parts(key).items()}}
    return methods[method_of(key) or next(iter(methods))].space.describe(key)


def _numbers(row: dict) -> dict:
    return {a: row[a] for a in ("fairness", "utility", "metrics")}


def best_verified(sequence: list[str], candidates: list[dict], method: str) -> dict | None:
    """A method's best configuration as chosen on the select split (its report-split numbers beside
    it), and after how many of the method's own LLM evaluations it was first evaluated."""
    best = next((c for c in candidates if method in c["best_of"]), None)
    if best is None:
        return None
    return {"key": best["key"], "select_fairness": best["select"]["fairness"], "select_utility": best["select"]["utility"],
            "report_fairness": best["report"]["fairness"], "report_utility": best["report"]["utility"],
            "first_reached_at_evaluation": sequence.index(best["key"]) + 1, "config": best["config"]}
