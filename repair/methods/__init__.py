"""One folder per repair method (`repair/methods/<name>/`): what it fits before searching, its
configuration space, which configurations it seeds, its intervention, its export. The phases they
share are in repair.runloop; the helpers they share are `artifacts` and `rows` here.

A run takes one method, a comma list of them or `all`: every method then searches in the same study
on the same suites and splits, with its share of `--budget-evals` (`DEFAULT_SHARES`, or
`--budget-shares`), and one select/choose/report step ranks them all together.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from importlib import import_module

from repair.errors import UserError


class _Registry(Mapping):
    """Method name -> its `Method` class, each imported when first asked for, in the canonical order.
    Eager imports here would make every module under repair/methods/ (a hook, a space) import every
    method, and with them the export and the loader: the registry must stay light to break no arrow."""

    def __init__(self, where: dict[str, str]):
        self._where = where  # name -> "module:Class"

    def __getitem__(self, name: str):
        module, _, cls = self._where[name].partition(":")
        return getattr(import_module(module), cls)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


METHODS = _Registry({"prune": "repair.methods.prune.method:Prune", "fairmed": "repair.methods.fairmed.method:FairMed",
                     "fairsteer": "repair.methods.fairsteer.method:FairSteer",
                     "experts": "repair.methods.experts.method:Experts"})
ALL = "all"
# Several methods share --budget-evals in these proportions (renormalised over the methods named).
# The experts evaluate a 13-point grid on shared forwards, so a small share covers them.
DEFAULT_SHARES = {"prune": 0.35, "fairmed": 0.30, "fairsteer": 0.25, "experts": 0.10}
# Defaults that depend on how many methods run: one method keeps the single-method defaults, several
# get a larger total budget and fewer finalists each (a held-out evaluation costs about ten search ones).
BUDGET_EVALS = {"one": 120, "several": 200}
VERIFY_TOP = {"one": 6, "several": 2}


def method_names(text: str) -> tuple[str, ...]:
    """The methods `--method` names (`all`, one, or a comma list), in the canonical order."""
    if text == ALL:
        return tuple(METHODS)
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if n not in METHODS:
            what = "an empty name" if not n else f"unknown method {n!r}"
            raise UserError(f"--method {text}: {what} (choose from {', '.join(METHODS)}, a comma list of them, or {ALL})")
    if len(set(names)) != len(names):
        raise UserError(f"--method {text} names a method twice (give each once)")
    return tuple(n for n in METHODS if n in names)


def defaults_for(text: str) -> str:
    """'one' or 'several': which column of BUDGET_EVALS and VERIFY_TOP a `--method` value takes."""
    return "one" if len(method_names(text)) == 1 else "several"


def shares(config) -> dict[str, float]:
    """Each method's fraction of the budget: `config.budget_shares` ('prune=2,fairmed=1', any positive
    weights) or DEFAULT_SHARES, normalised over the methods of the run."""
    names = method_names(config.method)
    if config.budget_shares is None:
        weights = {n: DEFAULT_SHARES[n] for n in names}
    else:
        weights = {}
        for item in config.budget_shares.split(","):
            name, sep, value = item.partition("=")
            name = name.strip()
            try:
                weight = float(value) if sep else float("nan")
            except ValueError:
                weight = float("nan")
            if name not in names:
                raise UserError(f"--budget-shares {config.budget_shares}: {name!r} is not a method of this run "
                                f"({', '.join(names)})")
            if not weight > 0:
                raise UserError(f"--budget-shares {config.budget_shares}: give each method a positive weight, "
                                "as in prune=2,fairmed=1")
            weights[name] = weight
        missing = [n for n in names if n not in weights]
        if missing:
            raise UserError(f"--budget-shares {config.budget_shares} gives {missing[0]} no share (name every method "
                            f"of the run: {', '.join(names)})")
    total = sum(weights.values())
    return {n: weights[n] / total for n in names}


def method_configs(config) -> dict:
    """Each method's own RunConfig: the run's, with its method and its share of the budget."""
    names = method_names(config.method)
    if len(names) == 1:
        return {names[0]: replace(config, method=names[0])}
    return {n: replace(config, method=n, budget_evals=int(config.budget_evals * s)) for n, s in shares(config).items()}


def build(config, model) -> dict:
    """The methods `config.method` names, for `model`, by name, each with its own config (`.config`)."""
    return {n: METHODS[n](c, model) for n, c in method_configs(config).items()}
