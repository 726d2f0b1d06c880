"""`repair run` and `repair report`: the batch job around a method, and the report from its records."""
from __future__ import annotations

import json
import sys
from itertools import count
from datetime import datetime, timezone
from pathlib import Path

from repair import failpoints
from repair.errors import UserError
from repair.evaluate import versions
from repair.export import model_card
from repair.methods import METHODS, describe, method_names, shares, short_name
from repair.models import load_model
from repair.objectives import ALWAYS_SHOWN, Objectives, fairness_interval, utility_interval
from repair.records import open_study, redact
from repair.rundir import RunConfig, prepare
from repair.space import MIN_SAMPLES, STACK, method_of, parts
from repair.stats import format_change
from repair.suites import build_suite


def validate(config: RunConfig) -> Objectives:
    names = config.method_names
    several = len(names) > 1
    if several and config.baselines:
        raise UserError(f"--baselines compares one method with random search or knockouts; --method {config.method} "
                        "compares methods with each other (run one method for its baselines)")
    if config.stack and not several:
        raise UserError(f"--stack applies the best configurations of two methods together; --method {config.method} "
                        "runs one (give --method all or a comma list)")
    if config.budget_shares is not None and not several:
        raise UserError(f"--budget-shares splits the budget between methods; --method {config.method} runs one "
                        "(leave the flag out, or give --method all or a comma list)")
    if config.export_all and not several:
        raise UserError(f"--export-all exports each method's best; --method {config.method} runs one, whose best "
                        "is the checkpoint (leave the flag out)")
    shares(config)  # a malformed --budget-shares is refused before anything loads
    for cls in METHODS.values():
        cls.check_config(config, names)
    unknown = [b for b in config.baselines if b not in ("random", "knockout")]
    if unknown:
        raise UserError(f"unknown baseline {unknown[0]!r} (choose from random, knockout)")
    objectives = Objectives.parse(config.fairness, config.utility)
    if not 0 < config.max_utility_loss < 1:
        raise UserError(f"--max-utility-loss must be a fraction between 0 and 1, got {config.max_utility_loss}")
    if not config.max_kl_uniform_rise >= 0:
        raise UserError(f"--max-kl-uniform-rise must be a fraction of 0 or more, got {config.max_kl_uniform_rise}")
    if config.max_q_drift is not None and not config.max_q_drift > 0:
        raise UserError(f"--max-q-drift must be a positive KL in nats, got {config.max_q_drift}")
    if config.rounds < 0 or config.per_round < 1 or config.verify_top < 1:
        raise UserError("--rounds must be >= 0, --per-round and --verify-top >= 1")
    if config.heartbeat < 1:
        raise UserError(f"--heartbeat must be at least 1 second, got {config.heartbeat}")
    if config.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {config.seed}")
    n_sample = config.budget_evals - config.rounds * config.per_round
    if not several and n_sample < MIN_SAMPLES:  # several methods: checked per method, once the model is loaded
        raise UserError(f"--budget-evals {config.budget_evals} leaves {n_sample} sampled masks after "
                        f"{config.rounds} rounds x {config.per_round}; the surrogates need at least {MIN_SAMPLES} "
                        f"(raise --budget-evals to {MIN_SAMPLES + config.rounds * config.per_round} or more)")
    for name in ("search_limit", "report_limit", "panel_bbq_limit"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return objectives


def run(config: RunConfig) -> int:
    objectives = validate(config)
    from repair.runloop import eval_config

    names = config.method_names
    files = {}
    labelling = tuple(s for n in names for s in METHODS[n].extra_suites(config))
    for split in ("search", "report"):  # validate every data file before any model or disk work
        for name in (*objectives.suites, *labelling):
            suite = build_suite(name, eval_config(config, split), None)
            files.update(getattr(suite, "files", {}) or {})
    if config.storage:
        open_study(config.storage, config.study_name)  # unreachable storage fails before anything is written
    loaded = load_model(config.model)  # a model the method cannot repair is refused before anything is written
    from repair.methods import build

    methods = build(config, loaded.model)
    if len(methods) > 1:
        check_budget(config, methods)
    for method in methods.values():
        method.check_inputs(loaded)  # e.g. the experts' base model: loadable, the target's vocabulary
    resuming = prepare(config, {"storage": redact(config.storage_url), "study": config.study_name,
                                "versions": versions(), "objectives": objectives.describe()})
    if resuming:
        print(f"resuming the run in {config.out}", file=sys.stderr)
    if config.workers_only:
        print(f"waiting for workers: repair worker --storage {redact(config.storage_url)} --study {config.study_name}", file=sys.stderr)
    from repair.runloop import bests_of, run_search

    result = run_search(config, loaded, objectives, methods)
    candidates = result.candidates
    chosen = next(c for c in candidates if c["chosen"])
    base = candidates[0]
    common = {"model": loaded.describe(), "objectives": objectives.describe(), "max_utility_loss": config.max_utility_loss,
              "guards": {"max_kl_uniform_rise": config.max_kl_uniform_rise, "max_q_drift": config.max_q_drift or "q_spread"},
              "excluded_on_select": excluded_rows(candidates),
              "search_select_spearman": result.search_select_spearman,
              "chosen_on": "select", "reported_on": "report", "data_files": files, "versions": versions(),
              "command": sys.argv, "n_llm_evaluations": result.n_evaluations}
    export(methods, loaded, chosen, base, config.out / "checkpoint", common, config)
    if config.export_all:  # several methods: their sequences are the methods and the stacks
        for name, c in bests_of(candidates).items():
            export(methods, loaded, c, base, config.out / "checkpoints" / name, common, config)
    failpoints.reached("export")
    if len(methods) > 1:
        from repair.costs import measure_costs

        measure_costs(config, loaded, methods, candidates, result)
    report = write_run_report(config.out)
    _print_summary(config, objectives, base, chosen, report, result, methods)
    return 0


def check_budget(config: RunConfig, methods: dict) -> None:
    """Refuse, naming the method and what it needs, a budget whose share leaves a method less than its minimum."""
    split = shares(config)
    for name, method in methods.items():
        need = method.min_budget()
        if method.config.budget_evals < need:
            total = next(t for t in count(config.budget_evals) if int(t * split[name]) >= need)  # whose share covers it
            raise UserError(f"--budget-evals {config.budget_evals} gives {name} {method.config.budget_evals} LLM evaluations "
                            f"({split[name]:.0%}); it needs at least {need} (raise --budget-evals to {total}, or give "
                            f"{name} a larger --budget-shares)")


def export(methods: dict, loaded, candidate: dict, base: dict, target: Path, common: dict, config: RunConfig) -> Path:
    """Export one configuration (a method's, a stack, or the unrepaired model) with its manifest and card."""
    key = candidate["key"]
    name = method_of(key) or next(iter(methods))
    manifest = {"method": name, **({"run_method": config.method} if config.method != name else {}),
                "model": common["model"], "key": key, **candidate["config"],
                **{k: v for k, v in common.items() if k != "model"},
                "metrics": {split: {"base": _side(base[split]), "repaired": _side(candidate[split])}
                            for split in ("search", "select", "report")},
                "changes": candidate["changes"]}  # repaired against unrepaired, paired 95% intervals, per held-out split
    if name == STACK:
        from repair.stacks import export_stack

        return export_stack(methods, loaded, key, target, manifest, model_card(manifest))
    return methods[name].export(loaded, key, target, manifest, model_card(manifest))


def _side(side: dict) -> dict:
    return {"fairness": side["fairness"], "utility": side["utility"], **side["metrics"]}


def summary_rows(objectives: Objectives, base: dict, chosen: dict, split: str) -> list[tuple[str, float, float, str]]:
    """(label, unrepaired, repaired, change) for the objectives, both association distances and, where
    measured, the pairs suite; labels end in their direction (see DIRECTION)."""
    desc = objectives.describe()
    b, c = base[split], chosen[split]
    changes = (chosen["changes"] or {}).get(split) or {"metrics": {}}
    rows = [(f"fairness: {desc['fairness']['name']} {DIRECTION['lower']}", b["fairness"], c["fairness"],
             format_change(changes.get("fairness"), compact=True)),
            (f"utility: {desc['utility']['name']} {DIRECTION[desc['utility']['better']]}", b["utility"], c["utility"],
             format_change(changes.get("utility"), compact=True))]
    for key in ALWAYS_SHOWN:
        if key in b["metrics"] and key in c["metrics"]:
            rows.append((f"{key.split('/')[0]}: {key.split('/')[-1]} {DIRECTION[b['metrics'][key]['better']]}",
                         b["metrics"][key]["value"], c["metrics"][key]["value"],
                         format_change(changes["metrics"].get(key), compact=True)))
    drift = (chosen.get("q_drift") or {}).get(split)
    if drift and drift["value"] == drift["value"]:  # not NaN: the split measured a reference
        spread = f"its own spread {drift['spread']:.4f}" if drift.get("spread") is not None else ""
        rows.append((f"q drift: KL(q_repaired || q_base) {DIRECTION['lower']}", 0.0, drift["value"], spread))
    return rows


DIRECTION = {"lower": "↓", "higher": "↑", "closer-to-zero": "→0", "closer-to-half": "→½", "reference": ""}
WIDTH = 80  # the console summary's columns


def _fit(text: str, indent: str = "") -> str:
    """`text` on one line of at most WIDTH columns, cut with '…' when longer."""
    line = indent + text
    return line if len(line) <= WIDTH else line[:WIDTH - 1] + "…"


def excluded_rows(candidates: list[dict]) -> list[dict]:
    """The verified configurations the guards refused on the select split: key, description, failed guards."""
    return [{"key": c["key"], "config": describe(c["method"], c["config"]), "failed": c["excluded_by"]}
            for c in candidates if c.get("excluded_by")]


def describe_chosen(candidate: dict) -> str:
    """A candidate as the console names it: its method and its description."""
    return f"{candidate['method']}: {describe(candidate['method'], candidate['config'])}"


def _print_summary(config, objectives, base, chosen, report, result, methods) -> None:
    print("\n" + "\n".join(summary_lines(config, objectives, base, chosen, report, result, methods)))


def summary_lines(config, objectives, base, chosen, report, result, methods) -> list[str]:
    """What a finished run prints: one screen (at most 40 lines of at most 80 columns): the choice, its
    paired changes on the report split, what the guards excluded, each method's best, where the
    checkpoint and the report are. The report holds the rest."""
    out = [f"LLM evaluations: {result.n_evaluations} in {result.seconds / 60:.1f} min"]
    if chosen is base:
        out.append("no repaired configuration passed the guards: keeping the unrepaired model")
    else:
        out.append(_fit(f"chosen: {short_name(chosen['method'], chosen['config'])}"))
        out.append(_fit(describe_chosen(chosen), "  "))
    out.append("  chosen on the select split, measured on the report split (no choice saw it)")
    rows = summary_rows(objectives, base, chosen, "report")
    width = min(32, max(len(r[0]) for r in rows))
    out.append(f"{'report split':<{width}} {'before':>9} {'after':>9}  change, paired 95% CI")
    for label, a, b, change in rows:
        arrow = label.rsplit(" ", 1)[-1]
        label = label if len(label) <= width else label[:width - 2 - len(arrow)] + "… " + arrow
        out.append(f"{label:<{width}} {a:9.4f} {b:9.4f}  {change}"[:WIDTH])
    out.append("  * CI excludes 0; no %: absolute; better: ↓ lower, →½ near 0.5, →0 near 0")
    rho = result.search_select_spearman
    out.append(_fit(f"search vs select fairness ranking of {rho['n']} verified configurations: Spearman "
                    f"{rho['spearman']:.2f}"))
    excluded = excluded_rows(result.candidates)
    if excluded:
        out.append(f"excluded on the select split by the guards: {len(excluded)} of {len(result.candidates) - 1} verified")
        out += [_fit(f"{row['config']}: {'; '.join(row['failed'])}", "  ") for row in excluded[:5]]
        if len(excluded) > 5:
            out.append(f"  ... {len(excluded) - 5} more in the report")
    if len(methods) > 1:
        from repair.runloop import bests_of

        out.append("each method's best on the report split: fairness, utility change")
        for name, c in bests_of(result.candidates).items():
            changes = (c["changes"] or {}).get("report") or {}
            fair, util = (changes.get(k) for k in ("fairness", "utility"))
            short = [f"{100 * x['relative']:+.1f}%{'*' if x['significant'] else ''}" if x else "n/a" for x in (fair, util)]
            out.append(_fit(f"{name:<9} {short[0]:>8} {short[1]:>8}  {short_name(c['method'], c['config'])}", "  "))
    out.append(f"checkpoint: {config.out / 'checkpoint'}")
    out.append(f"report:     {report}")
    return out


def point_names(candidates: list[dict]) -> list[str]:
    """Each candidate's name on the report: what it does ("prune 1 head: 0:8"), numbered where two
    would read the same ("prune 15 heads (2)")."""
    names = [short_name(c["method"], c["config"]) if i else "unrepaired" for i, c in enumerate(candidates)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def write_run_report(run_dir: Path) -> Path:
    """Build report/ from the run's records: the configurations measured on the report split (the
    unrepaired model, the chosen one, each method's best and the select split's front), with their
    paired changes against the unrepaired model, and the surrogate fits. Search- and select-split
    records are not plotted: their texts differ from the report split's, so their values would not
    be comparable on the same axes."""
    from reports import write_report

    run_dir = Path(run_dir)
    cfg_path, cand_path = run_dir / "config.json", run_dir / "candidates.jsonl"
    if not cfg_path.is_file() or not cand_path.is_file():
        raise UserError(f"{run_dir} holds no finished run (config.json and candidates.jsonl are needed)")
    saved = json.loads(cfg_path.read_text())
    identity = saved["identity"]
    objectives = Objectives.parse(identity["fairness"], identity["utility"])
    candidates = [json.loads(line) for line in cand_path.read_text().splitlines() if line.strip()]
    names = method_names(identity["method"])
    points, select_points = [], []
    for i, (c, name) in enumerate(zip(candidates, point_names(candidates))):
        kind = "base" if i == 0 else ("chosen" if c["chosen"] else "best" if c["best_of"] else "candidate")
        sel = c["select"]
        described = describe(c["method"], c["config"])
        select_points.append({"name": name, "method": "base" if i == 0 else c["methods"][0], "kind": kind, "split": "select",
                              "fairness": sel["fairness"], "utility": sel["utility"], "config": c["config"],
                              "description": described,
                              "fairness_ci": fairness_interval(objectives, sel["metrics"]),
                              "utility_ci": utility_interval(objectives, sel["metrics"])})
        rep = c["report"]
        if rep is None:  # verified on the select split only: not on the report's axes
            continue
        points.append({
            "name": name, "method": "base" if i == 0 else c["methods"][0], "best_of": c["best_of"],
            "kind": kind, "split": "report", "fairness": rep["fairness"], "utility": rep["utility"],
            "fairness_ci": fairness_interval(objectives, rep["metrics"]), "utility_ci": utility_interval(objectives, rep["metrics"]),
            "config": c["config"], "description": described, "excluded_by": c.get("excluded_by"),
            "changes": (c.get("changes") or {}).get("report"),
            "shown": {k: {"value": rep["metrics"][k]["value"], "better": rep["metrics"][k]["better"]}
                      for k in ALWAYS_SHOWN if k in rep["metrics"]},
            "select": {"fairness": c["select"]["fairness"], "utility": c["select"]["utility"]},
        })
    fits = []
    for method in names:
        folder = METHODS[method].surrogates_folder(run_dir)
        for plan in sorted(folder.glob("round-*.json"), key=lambda p: int(p.stem.split("-")[1])):
            data = json.loads(plan.read_text())
            for objective, fit in data["fits"].items():
                fits.append({"objective": objective, "predicted": fit["predicted"], "measured": fit["measured"], "scores": fit["scores"],
                             "label": f"{method} round {data['round']}" if len(names) > 1 else f"round {data['round']}"})
    meta = {"model": identity["model"]["model"], "method": identity["method"],
            "splits": "chosen on the select split; every number shown is from the report split, which no choice has seen",
            "command": " ".join(saved.get("command", [])), "versions": json.dumps(saved.get("versions", {})),
            "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **({"compare": "../compare.html"} if (run_dir / "compare.html").is_file() else {})}
    from repair.runloop import search_select_correlation

    rho = search_select_correlation(candidates)
    meta["search vs select"] = (f"Spearman {rho['spearman']:.2f} between the search-split and the select-split fairness of "
                                f"the {rho['n']} verified configurations (does the search's ranking hold on held-out wording)")
    probes = next((p for p in (cls.probe_scores(run_dir) for cls in METHODS.values()) if p is not None), None)
    desc = objectives.describe()
    costs = json.loads((run_dir / "costs.json").read_text()) if (run_dir / "costs.json").is_file() else None
    for row in (costs or {}).get("rows", []):
        row["description"] = describe(row["method"], row["config"]) if row.get("config") else None
    several = len(names) > 1
    return write_report(run_dir / "report", points, objectives={k: {"name": v["name"], "better": v["better"]} for k, v in desc.items()},
                        fits=fits, title=f"fairness-repair: {identity['method']} on {identity['model']['model']}", meta=meta,
                        probes=probes, select_points=select_points if several else None, costs=costs,
                        bests=best_rows(candidates, names) if several else None,
                        excluded=excluded_rows(candidates) if all("excluded_by" in c for c in candidates) else None)


def best_rows(candidates: list[dict], names: tuple[str, ...]) -> list[dict]:
    """Each method's best and each stack on the report split, as the report's table shows them: the
    changes against the unrepaired model with their paired intervals, and for a stack whether it is
    fairer there than the fairer of its parts."""
    by_key = {c["key"]: c for c in candidates}
    rows = []
    for c in candidates:
        label = next((m for m in c["best_of"] if m in names), None) or (STACK if c["method"] == STACK else None)
        if label is None or c["report"] is None:
            continue
        changes = (c["changes"] or {}).get("report") or {"metrics": {}}
        row = {"method": label, "config": describe(c["method"], c["config"]), "fairness": format_change(changes.get("fairness")),
               "utility": format_change(changes.get("utility")),
               **{key.split("/")[-1]: format_change(changes["metrics"].get(key)) for key in ALWAYS_SHOWN}}
        if c["method"] == STACK:
            found = [by_key.get(k) for k in parts(c["key"]).values()]
            if all(p is not None and p["report"] is not None for p in found):
                fairer = min(p["report"]["fairness"] for p in found)
                row["against_parts"] = ("fairer than both parts" if c["report"]["fairness"] < fairer
                                        else "not fairer than its fairer part")
        rows.append(row)
    return rows
