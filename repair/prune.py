"""`repair run --method prune`: Attention Pruning, end to end.

1. sample head masks (stratified over pruning ratios) and evaluate each on the LLM (search split);
2. fit surrogate ensembles mask -> fairness and mask -> log-perplexity on the records;
3. anneal over the surrogates for a sweep of trade-off weights, inside a trust region around
   evaluated masks; evaluate the most promising new masks for real; refit; repeat for `rounds`;
4. verify the best masks and the unrepaired model on the held-out report split; choose the fairest
   one that keeps utility within the allowed loss there; export it and write the report.
Every LLM evaluation is a trial in an Optuna study, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from repair import masks as M
from repair.evaluator import Evaluator
from repair.heads import HeadMasker, head_layout
from repair.io import write_json_atomic, write_text_atomic
from repair.models import LoadedModel
from repair.objectives import ConfigEvaluator, Objectives
from repair.records import Records, open_study
from repair.rundir import RunConfig
from repair.suites.base import EvalConfig
from search import TrustRegion, pareto_front, sweep
from surrogate import fit_surrogate, joint_predictor, save

TRUST_RADIUS = 12  # bits from the nearest evaluated mask that annealing may go
SWEEP_WEIGHTS = (3.0, 10.0, 30.0, 100.0)


def eval_config(config: RunConfig, split: str) -> EvalConfig:
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
    """Evaluates batches of head masks on one split, many masks per batched forward."""

    def __init__(self, loaded: LoadedModel, objectives: Objectives, split_config: EvalConfig):
        self.layout = head_layout(loaded.model)[:2]
        self.masker = HeadMasker(loaded.model, torch.ones((1, *self.layout)))
        self.evaluator = Evaluator(loaded.model, loaded.tokenizer, on_rows=self.masker.set_rows, progress=False)
        self.objective = ConfigEvaluator(objectives, split_config, loaded.tokenizer)

    def __call__(self, keys: list[str]) -> list[dict]:
        stack = np.stack([M.from_key(k, self.layout) for k in keys]).astype(np.float32)
        self.masker.set_masks(torch.from_numpy(stack))
        return self.objective.evaluate(self.evaluator, len(keys))

    def close(self) -> None:
        self.masker.remove()


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="mask", dynamic_ncols=True)


class PruneSearch:
    """One prune run over a loaded model; every phase resumes from the stored records."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, objectives: Objectives):
        self.config, self.loaded, self.objectives = config, loaded, objectives
        self.search = MaskScorer(loaded, objectives, eval_config(config, "search"))
        self.layout = self.search.layout
        self.n_bits = self.layout[0] * self.layout[1]
        self.max_pruned = int(np.floor(config.max_prune * self.n_bits))
        self.records = Records(open_study(config.storage_url, config.study_name))
        self.records.fail_stale()
        self.base_key = M.to_key(M.full_mask(self.layout))
        self.fits: list[dict] = []

    # ---- phase 1: sampled masks ----------------------------------------------------------
    def evaluate(self, items: list[tuple[str, str]], desc: str) -> list[str]:
        """Evaluate (key, phase) pairs not yet stored; return the keys in order (the method's sequence)."""
        with _bar(len(items), desc) as bar:
            self.records.evaluate(items, self.search, batch_size=self.config.batch_masks, progress=bar)
        return [k for k, _ in items]

    def sample(self) -> list[str]:
        cfg = self.config
        n_sample = cfg.budget_evals - cfg.rounds * cfg.per_round
        items = [(self.base_key, "base")]
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
    def training_data(self):
        done = self.records.completed()
        keys = [k for k, t in done.items() if t.user_attrs["phase"] != "report"]
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
        cfg = self.config
        plan_path = cfg.out / "surrogates" / f"round-{r}.json"
        if plan_path.is_file():  # annealed before a crash: evaluate the same candidates
            plan = json.loads(plan_path.read_text())
        else:
            plan = self._plan_round(r, plan_path)
        self.fits.append(plan["fits"])
        return self.evaluate([(k, f"round-{r}") for k in plan["candidates"]], f"round {r}/{cfg.rounds}: evaluating candidates")

    def _plan_round(self, r: int, plan_path: Path) -> dict:
        cfg = self.config
        keys, X, f, u = self.training_data()
        seed = cfg.seed * 1000 + r
        with tqdm(total=3, desc=f"round {r}/{cfg.rounds}: fitting surrogates, annealing", unit="step") as bar:
            f_model, f_scores = fit_surrogate(X, f, seed=seed, select_by="spearman", group_size=self.layout[1])
            bar.update(1)
            u_model, u_scores = fit_surrogate(X, u, seed=seed + 1, select_by="r2", group_size=self.layout[1])
            bar.update(1)
            folder = plan_path.parent
            folder.mkdir(parents=True, exist_ok=True)
            digests = {
                "fairness": save(f_model, folder / f"round-{r}-fairness.joblib"),
                "utility": save(u_model, folder / f"round-{r}-utility.joblib"),
            }
            predict = joint_predictor(f_model, u_model)
            limit = self.utility_limit_loss()
            found = sweep(
                predict, self.n_bits, weights=SWEEP_WEIGHTS, seed=seed, include_final=False,
                n_chains=256, n_steps=1500, flips=3, constraint=limit, kappa=0.5,
                max_pruned=self.max_pruned, trust=TrustRegion(X.astype(bool), TRUST_RADIUS),
                start=X[np.argsort(f)][np.arange(256) % len(X)].astype(bool),  # fairest evaluated masks
            )
            bar.update(1)
        evaluated = set(keys)
        order = np.argsort(np.where(found.feasible, found.fairness + 0.5 * found.fairness_std, np.inf))
        chosen = []
        for i in order:
            key = M.to_key(found.masks[i].reshape(self.layout))
            if key not in evaluated and key not in chosen and np.isfinite(found.fairness[i]):
                chosen.append(key)
            if len(chosen) == cfg.per_round:
                break
        holdout_pred = {
            "fairness": {"scores": f_scores.as_dict(), **_holdout_points(f_model, X, f, seed)},
            "utility": {"scores": u_scores.as_dict(), **_holdout_points(u_model, X, u, seed + 1)},
        }
        plan = {"round": r, "candidates": chosen, "fits": holdout_pred, "surrogate_sha256": digests,
                "n_records": len(keys), "selected_params": {"fairness": f_model.selected_params_, "utility": u_model.selected_params_}}
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


def verify(config: RunConfig, loaded: LoadedModel, objectives: Objectives, keys: list[str]) -> list[dict]:
    """Evaluate `keys` on the report split, resumably, in their own study."""
    scorer = MaskScorer(loaded, objectives, eval_config(config, "report"))
    records = Records(open_study(config.storage_url, config.study_name + "-report"))
    records.fail_stale()
    try:
        with _bar(len(keys), "verifying on held-out split") as bar:
            done = records.evaluate([(k, "report") for k in keys], scorer, batch_size=config.batch_masks, progress=bar)
    finally:
        scorer.close()
    return [{"key": k, **{a: done[k].user_attrs[a] for a in ("fairness", "utility", "metrics")}} for k in keys]


def run_prune(config: RunConfig, loaded: LoadedModel, objectives: Objectives) -> dict:
    started = time.perf_counter()
    search = PruneSearch(config, loaded, objectives)
    sequences: dict[str, list[str]] = {}
    try:
        sequences["prune"] = search.sample()
        for r in range(1, config.rounds + 1):
            sequences["prune"] += search.round(r)
        if "random" in config.baselines:
            sequences["random"] = search.random_baseline()
        if "knockout" in config.baselines:
            sequences["knockout"] = search.knockout_baseline()
        finalists = {method: search.finalists(seq) for method, seq in sequences.items()}
    finally:
        search.search.close()
    done = search.records.completed()
    to_verify = list(dict.fromkeys([search.base_key] + [k for keys in finalists.values() for k in keys]))
    verified = verify(config, loaded, objectives, to_verify)
    base_report = verified[0]
    bound = objectives.utility_bound(base_report["utility"], config.max_utility_loss)
    meeting = [v for v in verified[1:] if v["key"] in finalists["prune"] and objectives.meets(v["utility"], bound)]
    chosen = min(meeting, key=lambda v: v["fairness"]) if meeting else base_report
    candidates = []
    for v in verified:
        t = done[v["key"]]
        mask = M.from_key(v["key"], search.layout)
        candidates.append({
            "key": v["key"], "phase": t.user_attrs["phase"], "pruned_heads": M.pruned_heads(mask),
            "methods": [m for m, keys in finalists.items() if v["key"] in keys],
            "chosen": v["key"] == chosen["key"], "meets_constraint_on_report": objectives.meets(v["utility"], bound),
            "search": {a: t.user_attrs[a] for a in ("fairness", "utility", "metrics")},
            "report": {a: v[a] for a in ("fairness", "utility", "metrics")},
        })
    write_text_atomic(config.out / "candidates.jsonl", "".join(json.dumps(c) + "\n" for c in candidates))
    write_json_atomic(config.out / "methods.json", {
        method: {"evaluations": len(seq), "best": best_verified(seq, candidates, method)} for method, seq in sequences.items()
    })
    return {"candidates": candidates, "fits": search.fits, "layout": list(search.layout),
            "n_evaluations": len(done), "seconds": time.perf_counter() - started}


def best_verified(sequence: list[str], candidates: list[dict], method: str) -> dict | None:
    """A method's fairest verified mask that meets the constraint on the report split, and after how
    many of the method's own LLM evaluations it was first evaluated."""
    ok = [c for c in candidates if method in c["methods"] and c["meets_constraint_on_report"]]
    if not ok:
        return None
    best = min(ok, key=lambda c: c["report"]["fairness"])
    return {"key": best["key"], "report_fairness": best["report"]["fairness"], "report_utility": best["report"]["utility"],
            "first_reached_at_evaluation": sequence.index(best["key"]) + 1, "n_pruned": len(best["pruned_heads"])}
