"""`repair run --method prune`: Attention Pruning, end to end.

1. sample head masks (stratified over pruning ratios) and evaluate each on the LLM (search split);
2. fit surrogate ensembles mask -> fairness and mask -> log-perplexity on the records;
3. anneal over the surrogates for a sweep of trade-off weights, inside a trust region around
   evaluated masks; evaluate the most promising new masks for real; refit; repeat for `rounds`;
4. verify the best masks and the unrepaired model on the held-out `select` split; choose the fairest
   one that keeps utility within the allowed loss there; only then measure the unrepaired model, the
   chosen mask and the select split's front on the `report` split, which nothing ever chooses by;
   export the chosen mask and write the report.
Every LLM evaluation is a trial in an Optuna study, so a killed run resumes where it stopped, and
`repair worker` processes on other machines can take evaluations from the same study.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from repair import failpoints, masks as M
from repair.errors import UserError
from repair.evaluator import Evaluator
from repair.heads import HeadMasker, head_layout
from repair.io import write_json_atomic, write_text_atomic
from repair.models import LoadedModel
from repair.objectives import ConfigEvaluator, Objectives, paired_changes
from repair.records import Records, open_study
from repair.rundir import RunConfig
from repair.suites.base import EvalConfig
from search import TrustRegion, pareto_front, sweep
from surrogate import ChecksumError, fit_surrogate, joint_predictor, load, save

TRUST_RADIUS = 12  # bits from the nearest evaluated mask that annealing may go
# Masks pruning the k heads whose removal the fairness gradient says helps most, evaluated first.
GRADIENT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)
SWEEP_WEIGHTS = (3.0, 10.0, 30.0, 100.0)


SPLITS = ("search", "select", "report")


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


class MaskScorer:
    """Evaluates batches of head masks, many masks per batched forward, on any of the given splits."""

    def __init__(self, loaded: LoadedModel, objectives: Objectives, splits: dict[str, EvalConfig]):
        self.layout = head_layout(loaded.model)[:2]
        self.masker = HeadMasker(loaded.model, torch.ones((1, *self.layout)))
        self.evaluator = Evaluator(loaded.model, loaded.tokenizer, on_rows=self.masker.set_rows, progress=False)
        self.objectives = {split: ConfigEvaluator(objectives, cfg, loaded.tokenizer) for split, cfg in splits.items()}

    def files(self) -> dict[str, str]:
        """Data file -> sha256 of every suite read, to check that workers read the same data."""
        return {f: h for ev in self.objectives.values() for s in ev.suites.values() for f, h in (getattr(s, "files", {}) or {}).items()}

    def scorer(self, split: str):
        """Evaluates a batch of mask keys on `split`; held-out evaluations keep the per-unit numbers
        that paired intervals of their changes need."""
        def score(keys: list[str]) -> list[dict]:
            stack = np.stack([M.from_key(k, self.layout) for k in keys]).astype(np.float32)
            self.masker.set_masks(torch.from_numpy(stack))
            return self.objectives[split].evaluate(self.evaluator, len(keys), keep_units=split != "search")
        return score

    def close(self) -> None:
        self.masker.remove()


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="mask", dynamic_ncols=True)


class PruneSearch:
    """One prune run over a loaded model; every phase resumes from the stored records."""

    def __init__(self, config: RunConfig, objectives: Objectives, scorer: MaskScorer):
        self.config, self.objectives = config, objectives
        self.scorer = scorer
        self.layout = scorer.layout
        self.n_bits = self.layout[0] * self.layout[1]
        self.max_pruned = int(np.floor(config.max_prune * self.n_bits))
        self.records = Records(open_study(config.storage_url, config.study_name, config.heartbeat))
        self.records.fail_stale(local_dead=True)
        self.base_key = M.to_key(M.full_mask(self.layout))
        self.fits: list[dict] = []

    # ---- phase 1: sampled masks ----------------------------------------------------------
    def evaluate(self, items: list[tuple[str, str]], desc: str) -> list[str]:
        """Evaluate (key, phase) pairs not yet stored; return the keys in order (the method's sequence)."""
        with _bar(len(items), desc) as bar:
            self.records.evaluate(items, self.scorer.scorer("search"), batch_size=self.config.batch_masks, progress=bar,
                                  work=not self.config.workers_only, stage="sampling")
        return [k for k, _ in items]

    def head_gradient(self) -> np.ndarray | None:
        """d fairness / d head mask on the search split (see ConfigEvaluator.fairness_gradient),
        computed once and kept in the run directory; None for objectives without a gradient."""
        path = self.config.out / "surrogates" / "head-gradient.json"
        if not path.is_file():
            with tqdm(total=1, desc="fairness gradient over head masks", unit="pass") as bar:
                grad = self.scorer.objectives["search"].fairness_gradient(self.scorer.evaluator, self.scorer.masker, self.layout)
                bar.update(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"gradient": None if grad is None else grad.tolist()})
        grad = json.loads(path.read_text())["gradient"]
        return None if grad is None else np.array(grad)

    def sample(self) -> list[str]:
        """The unrepaired model, the masks the fairness gradient ranks best (pruning a head changes
        fairness by about -gradient), then stratified random masks, in all the budget left for rounds."""
        cfg = self.config
        grad = self.head_gradient()
        ranked = M.ranked_masks(grad, GRADIENT_COUNTS, self.max_pruned) if grad is not None else []
        n_sample = cfg.budget_evals - cfg.rounds * cfg.per_round - len(ranked)
        items = [(self.base_key, "base")] + [(M.to_key(m), "gradient") for m in ranked]
        items += [(M.to_key(m), "sample") for m in M.stratified_masks(n_sample, self.layout, cfg.max_prune, cfg.seed)]
        if cfg.knockouts:
            items += [(M.to_key(m), "knockout") for m in M.knockout_masks(self.layout)]
        return self.evaluate(items, "sampling masks")

    # ---- baselines with the same LLM-evaluation budget ---------------------------------------
    def random_baseline(self) -> list[str]:
        """Random search: `budget_evals` masks sampled like the search's own, with another seed."""
        masks = M.stratified_masks(self.config.budget_evals, self.layout, self.config.max_prune, self.config.seed + 7919)
        return self.evaluate([(self.base_key, "base")] + [(M.to_key(m), "random") for m in masks], "baseline: random masks")

    def knockout_baseline(self, n_levels: int = 8) -> list[str]:
        """FASP-style ranking (REFERENCES.md section 2): knock out heads one at a time, set aside the
        20% whose removal costs the most utility, prune the rest in order of fairness gained, at
        `n_levels` pruning levels. Knockouts take the budget left after the levels, heads in a seeded
        random order when the budget cannot cover all of them."""
        cfg = self.config
        n_levels = max(1, min(n_levels, self.max_pruned))
        order = np.random.default_rng(cfg.seed + 104729).permutation(self.n_bits)[: cfg.budget_evals - n_levels]
        knock = {int(i): M.to_key(np.arange(self.n_bits).reshape(self.layout) != i) for i in order}
        keys = self.evaluate([(self.base_key, "base")] + [(k, "knockout") for k in knock.values()], "baseline: head knockouts")
        done = self.records.completed()
        base = done[self.base_key].values
        gain = {i: done[k].values[0] - base[0] for i, k in knock.items()}  # negative: fairer without head i
        cost = {i: done[k].values[1] - base[1] for i, k in knock.items()}
        protected = set(sorted(cost, key=cost.get, reverse=True)[: int(np.ceil(0.2 * len(cost)))])
        ranked = [i for i in sorted(gain, key=gain.get) if i not in protected]
        levels = []
        for j in range(1, n_levels + 1):
            bits = np.ones(self.n_bits, dtype=bool)
            bits[ranked[: max(1, round(self.max_pruned * j / n_levels))]] = False
            levels.append((M.to_key(bits.reshape(self.layout)), "knockout-ranked"))
        return keys + self.evaluate(levels, "baseline: ranked pruning levels")

    # ---- phase 2-3: surrogates and annealing, in rounds ------------------------------------
    def training_data(self, before_round: int | None = None):
        """Stored masks and their objectives, sorted by key (not by when each was evaluated, so a
        resumed or distributed run sees the same rows). With `before_round`, only what the search
        itself had evaluated before that round (no baseline's evaluations)."""
        done = self.records.completed()
        search_phases = {"base", "gradient", "sample", "knockout"} | {f"round-{j}" for j in range(1, before_round or 0)}
        keys = sorted(k for k, t in done.items() if t.user_attrs["phase"] in search_phases or before_round is None)
        X = np.stack([M.from_key(k, self.layout).ravel() for k in keys]).astype(np.float64)
        f = np.array([done[k].values[0] for k in keys])
        u = np.array([done[k].values[1] for k in keys])
        return keys, X, f, u

    def base_trial(self):
        return self.records.completed()[self.base_key]

    def utility_limit_loss(self) -> float:
        """The largest utility loss (search split) that still meets the constraint."""
        base_utility = self.base_trial().user_attrs["utility"]
        bound = self.objectives.utility_bound(base_utility, self.config.max_utility_loss)
        return self.objectives.utility_loss(bound)

    def round(self, r: int) -> list[str]:
        """Fit, anneal, evaluate the candidates. Each step's result is on disk before the next
        starts (fitted surrogates with their checksums, then the plan), so a rerun after a crash
        continues from the last finished step with the same numbers."""
        folder = self.config.out / "surrogates"
        plan_path = folder / f"round-{r}.json"
        if plan_path.is_file():
            plan = json.loads(plan_path.read_text())
        else:
            plan = self._anneal(r, plan_path, *self._fit(r, folder))
        self.fits.append(plan["fits"])
        return self.evaluate([(k, f"round-{r}") for k in plan["candidates"]], f"round {r}/{self.config.rounds}: evaluating candidates")

    def _fit(self, r: int, folder: Path):
        """The round's surrogates: fitted now, or read back (checksum-verified) from an earlier attempt."""
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
                return keys, X, f, u, seed, *models, fit
        with tqdm(total=2, desc=f"round {r}/{self.config.rounds}: fitting surrogates", unit="model") as bar:
            grad = self.head_gradient()  # the surrogate learns a scale of and corrections to its linear prediction
            f_model, f_scores = fit_surrogate(X, f, seed=seed, select_by="spearman", group_size=self.layout[1],
                                              base_params=None if grad is None else {"prior": grad.ravel()})
            bar.update(1)
            failpoints.reached("fitting")
            u_model, u_scores = fit_surrogate(X, u, seed=seed + 1, select_by="r2", group_size=self.layout[1])
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
        return keys, X, f, u, seed, f_model, u_model, fit

    def _anneal(self, r: int, plan_path: Path, keys, X, f, u, seed, f_model, u_model, fit) -> dict:
        cfg = self.config
        failpoints.reached("annealing")
        with tqdm(total=len(SWEEP_WEIGHTS), desc=f"round {r}/{cfg.rounds}: annealing", unit="weight") as bar:
            found = sweep(
                joint_predictor(f_model, u_model), self.n_bits, weights=SWEEP_WEIGHTS, seed=seed, include_final=False,
                n_chains=256, n_steps=1500, flips=3, constraint=self.utility_limit_loss(), kappa=0.5,
                max_pruned=self.max_pruned, trust=TrustRegion(X.astype(bool), TRUST_RADIUS),
                start=X[np.argsort(f)][np.arange(256) % len(X)].astype(bool),  # fairest evaluated masks
                callback=lambda: (bar.update(1), failpoints.reached("annealing")),
            )
        evaluated = set(keys)
        # rank in float32 with the mask as tie-break: masks whose predictions differ only by float noise
        # (e.g. in bits the surrogate ignores) must come out in the same order on every rerun and machine
        score = np.where(found.feasible, found.fairness + 0.5 * found.fairness_std, np.inf).astype(np.float32)
        found_keys = [M.to_key(m.reshape(self.layout)) for m in found.masks]
        chosen = []
        for i in sorted(range(len(found_keys)), key=lambda i: (score[i], found_keys[i])):
            if found_keys[i] not in evaluated and found_keys[i] not in chosen and np.isfinite(score[i]):
                chosen.append(found_keys[i])
            if len(chosen) == cfg.per_round:
                break
        holdout_pred = {
            "fairness": {"scores": fit["scores"]["fairness"], **_holdout_points(f_model, X, f, seed)},
            "utility": {"scores": fit["scores"]["utility"], **_holdout_points(u_model, X, u, seed + 1)},
        }
        plan = {"round": r, "candidates": chosen, "fits": holdout_pred, "surrogate_sha256": fit["sha256"],
                "n_records": len(keys), "selected_params": {o: {k: v for k, v in m.selected_params_.items() if k != "prior"}
                                    for o, m in (("fairness", f_model), ("utility", u_model))}}
        write_json_atomic(plan_path, plan)
        return plan

    # ---- phase 4: verification on the held-out split ----------------------------------------
    def finalists(self, sequence: list[str] | None = None) -> list[str]:
        """Masks worth verifying: the search split's front within the utility limit, fairest first
        (among the keys of `sequence` when given: one method's evaluations)."""
        keys, X, f, u = self.training_data()
        if sequence is not None:
            wanted = set(sequence)
            pick = np.array([k in wanted for k in keys])
            keys, f, u = [k for k, p in zip(keys, pick) if p], f[pick], u[pick]
        ok = u <= self.utility_limit_loss()
        idx = np.nonzero(ok)[0]
        front = idx[pareto_front(np.c_[f[idx], u[idx]], ("min", "min"))] if len(idx) else idx
        ranked = list(front[np.argsort(f[front])]) + [i for i in idx[np.argsort(f[idx])] if i not in set(front)]
        out = [keys[i] for i in ranked if keys[i] != self.base_key]
        return out[: self.config.verify_top]


def _holdout_points(model, X, y, seed):
    """Predicted vs measured on the surrogate's held-out fifth, for the report's fit plots."""
    from surrogate.fit import split_holdout

    _, ho = split_holdout(len(y), 0.2, seed)
    return {"predicted": model.predict(X[ho]).tolist(), "measured": y[ho].tolist()}


def verify(config: RunConfig, scorer: MaskScorer, keys: list[str], split: str) -> dict[str, dict]:
    """Evaluate `keys` on a held-out split (`select` or `report`), resumably, in that split's study."""
    records = Records(open_study(config.storage_url, f"{config.study_name}-{split}", config.heartbeat))
    records.fail_stale(local_dead=True)
    desc = "verifying finalists on the select split" if split == "select" else "measuring on the report split"
    with _bar(len(keys), desc) as bar:
        done = records.evaluate([(k, split) for k in keys], scorer.scorer(split), batch_size=config.batch_masks,
                                progress=bar, work=not config.workers_only, stage="verification")
    return {k: {a: done[k].user_attrs.get(a) for a in ("fairness", "utility", "metrics", "units")} for k in keys}


def choose(objectives: Objectives, selected: dict[str, dict], base_key: str, allowed: list[str], max_loss: float) -> str:
    """The fairest of `allowed` whose utility on the select split stays within `max_loss` of the
    unrepaired model's there; the unrepaired model when none does. Reads select-split records only."""
    bound = objectives.utility_bound(selected[base_key]["utility"], max_loss)
    meeting = [k for k in allowed if k in selected and k != base_key and objectives.meets(selected[k]["utility"], bound)]
    return min(meeting, key=lambda k: (selected[k]["fairness"], k)) if meeting else base_key


def select_front(objectives: Objectives, selected: dict[str, dict]) -> list[str]:
    """The verified configurations that no other beats on both objectives on the select split."""
    keys = list(selected)
    points = np.array([[selected[k]["fairness"], objectives.utility_loss(selected[k]["utility"])] for k in keys])
    return [keys[i] for i in pareto_front(points, ("min", "min"))]


def publish(study, config: RunConfig, files: dict[str, str]) -> None:
    """Store what a `repair worker` needs to evaluate for this run: the configuration and the data's hashes."""
    study.set_user_attr("run", {"identity": config.identity(), "data_dir": str(config.data_dir) if config.data_dir else None,
                                "heartbeat": config.heartbeat, "data_sha256": sorted(files.values())})
    study.set_user_attr("finished", False)


def run_prune(config: RunConfig, loaded: LoadedModel, objectives: Objectives) -> dict:
    started = time.perf_counter()
    scorer = MaskScorer(loaded, objectives, {split: eval_config(config, split) for split in SPLITS})
    try:
        search = PruneSearch(config, objectives, scorer)
        publish(search.records.study, config, scorer.files())
        sequences: dict[str, list[str]] = {}
        sequences["prune"] = search.sample()
        for r in range(1, config.rounds + 1):
            sequences["prune"] += search.round(r)
        if "random" in config.baselines:
            sequences["random"] = search.random_baseline()
        if "knockout" in config.baselines:
            sequences["knockout"] = search.knockout_baseline()
        finalists = {method: search.finalists(seq) for method, seq in sequences.items()}
        done = search.records.completed()
        base = search.base_key
        to_select = list(dict.fromkeys([base] + [k for keys in finalists.values() for k in keys]))
        selected = verify(config, scorer, to_select, "select")
        chosen = choose(objectives, selected, base, finalists["prune"], config.max_utility_loss)
        best = {m: choose(objectives, selected, base, keys, config.max_utility_loss) for m, keys in finalists.items()}
        # only now, after every choice, the report split: what the user is shown
        to_report = list(dict.fromkeys([base, chosen, *best.values(), *select_front(objectives, selected)]))
        reported = verify(config, scorer, to_report, "report")
        search.records.study.set_user_attr("finished", True)  # workers may leave
    finally:
        scorer.close()
    bound = objectives.utility_bound(selected[base]["utility"], config.max_utility_loss)
    measured = {"select": selected, "report": reported}
    candidates = [{
        "key": k, "phase": done[k].user_attrs["phase"], "pruned_heads": M.pruned_heads(M.from_key(k, search.layout)),
        "methods": [m for m, keys in finalists.items() if k in keys], "chosen": k == chosen,
        "best_of": [m for m, b in best.items() if b == k and k != base],
        "meets_constraint_on_select": objectives.meets(selected[k]["utility"], bound),
        "search": _numbers(done[k].user_attrs),
        **{split: _numbers(rows[k]) if k in rows else None for split, rows in measured.items()},
        # against the unrepaired model on the same split, with paired intervals
        "changes": {split: paired_changes(objectives, rows[base], rows[k], seed=config.seed) if k in rows and k != base else None
                    for split, rows in measured.items()},
    } for k in to_select]
    write_text_atomic(config.out / "candidates.jsonl", "".join(json.dumps(c) + "\n" for c in candidates))
    write_json_atomic(config.out / "methods.json", {
        method: {"evaluations": len(seq), "best": best_verified(seq, candidates, method)} for method, seq in sequences.items()
    })
    return {"candidates": candidates, "fits": search.fits, "layout": list(search.layout),
            "n_evaluations": len(done), "seconds": time.perf_counter() - started}


def _numbers(row: dict) -> dict:
    return {a: row[a] for a in ("fairness", "utility", "metrics")}


def best_verified(sequence: list[str], candidates: list[dict], method: str) -> dict | None:
    """A method's best mask as chosen on the select split (its report-split numbers beside it), and
    after how many of the method's own LLM evaluations it was first evaluated."""
    best = next((c for c in candidates if method in c["best_of"]), None)
    if best is None:
        return None
    return {"key": best["key"], "select_fairness": best["select"]["fairness"], "select_utility": best["select"]["utility"],
            "report_fairness": best["report"]["fairness"], "report_utility": best["report"]["utility"],
            "first_reached_at_evaluation": sequence.index(best["key"]) + 1, "n_pruned": len(best["pruned_heads"])}
