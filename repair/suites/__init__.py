"""The benchmark suites. Each suite validates its data when it is built, so bad input fails before
any model work, and scores through a `Scorer` (the fast evaluator or the reference)."""
from __future__ import annotations

from importlib import import_module

from repair.errors import UserError
from repair.suites.base import EvalConfig

# name -> (module, class, needs --data-dir)
REGISTRY = {
    "association": ("repair.suites.association", "AssociationSuite", False),
    "pairs": ("repair.suites.pairs", "PairsSuite", False),
    "text": ("repair.suites.perplexity", "TextSuite", False),
    "bbq": ("repair.suites.bbq", "BBQSuite", True),
    "wikitext": ("repair.suites.perplexity", "WikiTextSuite", True),
    "mmlu": ("repair.suites.mmlu", "MMLUSuite", True),
}
FAIRNESS_SUITES = ("association", "bbq", "pairs")
UTILITY_SUITES = ("text", "wikitext", "mmlu")


def build_suite(name: str, config: EvalConfig, tokenizer=None):
    if name not in REGISTRY:
        raise UserError(f"unknown suite {name!r} (choose from {', '.join(REGISTRY)})")
    module, cls, needs_data = REGISTRY[name]
    if needs_data and config.data_dir is None:
        raise UserError(f"suite {name!r} reads benchmark files: pass --data-dir DIR or set REPAIR_DATA_DIR")
    if needs_data and not config.data_dir.is_dir():
        raise UserError(f"data directory {config.data_dir} does not exist (check --data-dir / REPAIR_DATA_DIR)")
    return getattr(import_module(module), cls)(config, tokenizer)
