"""`repair evaluate`: score a model on the chosen suites, print a table, keep every item."""
from __future__ import annotations

import platform
import time
from importlib import metadata

from repair.evaluator import Evaluator
from repair.models import LoadedModel
from repair.suites import build_suite
from repair.suites.base import EvalConfig, SuiteResult

ARROWS = {"lower": "lower is better", "higher": "higher is better", "closer-to-zero": "closer to 0 is better",
          "closer-to-half": "closer to 0.5 is better", "reference": "a reference, no direction"}


def build_suites(names: list[str], config: EvalConfig, tokenizer) -> dict:
    """Build (and so validate) every suite before any model work."""
    return {name: build_suite(name, config, tokenizer) for name in names}


def run_suites(suites: dict, scorer) -> dict[str, SuiteResult]:
    return {name: suite.run(scorer) for name, suite in suites.items()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("fairness-repair", "torch", "transformers", "numpy", "scikit-learn", "optuna"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def evaluate(loaded: LoadedModel, suites: dict, config: EvalConfig, *, batch_tokens: int, progress: bool,
             results_out: dict | None = None) -> dict:
    """Score `suites` (built by `build_suites` before the model was loaded, so bad data failed fast) on
    the model's own forward, whatever checkpoint's repair is attached to it. `results_out`, when given,
    receives the SuiteResults themselves (their metrics keep per-unit numbers)."""
    for suite in suites.values():
        suite.tokenizer = loaded.tokenizer  # BBQ's choice mode wraps prompts in the chat template
    scorer = Evaluator(loaded.model, loaded.tokenizer, batch_tokens=batch_tokens, progress=progress)
    start = time.perf_counter()
    results = run_suites(suites, scorer)
    if results_out is not None:
        results_out.update(results)
    return {
        "model": loaded.describe(),
        "model_config": loaded.model.config.to_dict(),
        "config": {k: (str(v) if v is not None and k == "data_dir" else v) for k, v in config.__dict__.items()},
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 2),
        "files": {path: digest for r in results.values() for path, digest in r.files.items()},
        # (prompt, option) pairs whose joint tokenisation merged across the boundary (see evaluator._Tokens)
        "boundary_merges": scorer.boundary_merges,
        "suites": {name: r.as_dict() for name, r in results.items()},
    }


def format_table(report: dict) -> str:
    rows = [("suite", "metric", "value", "95% CI", "n", "direction")]
    for name, suite in report["suites"].items():
        for metric, m in suite["metrics"].items():
            rows.append((name, metric, f"{m['value']:.4f}", f"[{m['ci_low']:.4f}, {m['ci_high']:.4f}]", str(m["n"]), ARROWS[m["better"]]))
        dropped = suite["info"].get("dropped")
        if isinstance(dropped, dict) and sum(dropped.values()):
            rows.append((name, "dropped (biased answer undetermined)", str(sum(dropped.values())), "", "", ""))
    if report.get("boundary_merges"):
        rows.append(("all", "options scored on their own tokens (merge across the prompt boundary)",
                     str(report["boundary_merges"]), "", "", ""))
    return _text_table(rows)


def compare(before: dict[str, SuiteResult], after: dict[str, SuiteResult], seed: int = 0) -> dict[str, dict]:
    """Every metric's change from `before` to `after` (the same suites and items, scored for two
    models), with a paired bootstrap 95% interval: {"suite/metric": Change.as_dict()}."""
    from repair.stats import metric_seed, paired_change

    out = {}
    for name, result in after.items():
        for key, m in result.metrics.items():
            b = before[name].metrics[key]
            if m.units is None or b.units is None or b.units.n != m.units.n:
                continue
            out[f"{name}/{key}"] = paired_change(b.units, m.units, seed=metric_seed(f"{name}/{key}", seed)).as_dict()
    return out


def format_comparison(changes: dict[str, dict], before_label: str, after_label: str) -> str:
    """One row per metric: both values, the relative change with its paired 95% interval (the absolute
    one where a relative change has no meaning, see `stats.Change`), the interval's half-width, and
    whether it excludes zero."""
    from repair.stats import format_change

    rows = [("metric", before_label, after_label, "change [paired 95% CI]", "half-width", "")]
    for name, c in changes.items():
        relative = c.get("relative_defined", True)
        lo, hi = c["relative_ci"] if relative else c["delta_ci"]
        rows.append((name, f"{c['before']:.4f}", f"{c['after']:.4f}", format_change(c).removesuffix(" *"),
                     f"+-{(hi - lo) / 2:.1%}" if relative else f"+-{(hi - lo) / 2:.4g}", "excludes 0" if c["significant"] else ""))
    return _text_table(rows)


def _text_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
