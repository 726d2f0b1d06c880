"""One folder per repair method (`repair/methods/<name>/`): what it fits before searching, its
configuration space, which configurations it seeds, its intervention, its export. The phases they
share are in repair.runloop; the helpers they share are `artifacts` and `rows` here.

A run takes one method, a comma list of them or `all`: every method then searches in the same study
on the same suites and splits, with its share of `--budget-evals` (each class's `budget_share`,
or `--budget-shares`), and one select/choose/report step ranks them all together.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from importlib import import_module

from repair.errors import UserError


class _Registry(Mapping):
    """Method name -> its `Method` class, each imported when first asked for, in the order registered.
    Eager imports here would make every module under repair/methods/ (a hook, a space) import every
    method, and with them the export and the loader: the registry must stay light to break no arrow.
    `options(name)` imports only the method's Options (its flags), so the command line builds without
    torch."""

    def __init__(self):
        self._where: dict[str, tuple] = {}  # name -> (Method class or "module:Class", Options likewise or None)

    def register(self, name: str, method, options=None) -> None:
        """Add a method: its class (or "module:Class" to import it when first needed) and its Options
        dataclass likewise (None: no flags of its own). A name already registered is refused."""
        if name in self._where:
            raise ValueError(f"a method named {name!r} is registered already")
        self._where[name] = (method, options)

    def unregister(self, name: str) -> None:
        del self._where[name]

    def __getitem__(self, name: str):
        return _resolve(self._where[name][0])

    def options(self, name: str) -> type:
        from repair.methods.base import NoOptions

        found = self._where[name][1]
        return NoOptions if found is None else _resolve(found)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _resolve(where):
    if not isinstance(where, str):
        return where
    module, _, name = where.partition(":")
    return getattr(import_module(module), name)


METHODS = _Registry()
for _name, _cls in (("prune", "Prune"), ("fairmed", "FairMed"), ("fairsteer", "FairSteer"), ("experts", "Experts")):
    METHODS.register(_name, f"repair.methods.{_name}.method:{_cls}", f"repair.methods.{_name}.options:{_cls}Options")
ALL = "all"
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
    weights) or each method's `budget_share`, normalised over the methods of the run."""
    names = config.method_names
    if config.budget_shares is None:
        weights = {n: METHODS[n].budget_share for n in names}
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
    names = config.method_names
    if len(names) == 1:
        return {names[0]: replace(config, method=names[0])}
    return {n: replace(config, method=n, budget_evals=int(config.budget_evals * s)) for n, s in shares(config).items()}


def build(config, model) -> dict:
    """The methods `config.method` names, for `model`, by name, each with its own config (`.config`)."""
    return {n: METHODS[n](c, model) for n, c in method_configs(config).items()}


def short_name(method: str, config: dict) -> str:
    """A configuration's name on the report ("prune 1 head: 0:8", "experts alpha 0.75 + prune 5 heads"):
    each part's `short_name` for a stack, "unrepaired" for the unrepaired model."""
    if "stack" in config:
        return " + ".join(METHODS[m].short_name(part) for m, part in config["stack"].items())
    return METHODS[method].short_name(config) if method in METHODS else "unrepaired"


def describe(method: str, config: dict) -> str:
    """A configuration of `method` in a few words (its `describe`; each part's for a stack, "unrepaired"
    for the unrepaired model): the one text of the console summary, the report and the model card."""
    if "stack" in config:
        return " + ".join(f"{m}: {METHODS[m].describe(part)}" for m, part in config["stack"].items())
    return METHODS[method].describe(config) if method in METHODS else "unrepaired"
