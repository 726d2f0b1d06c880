"""The contract every repair method honours: what the shared pipeline (repair.runloop, repair.run,
repair.worker, repair.stacks, repair.costs) calls on it. A method subclasses `Method`, implements the
abstract members and overrides the optional ones whose defaults do not fit; the pipeline calls members
and never tests for them.

The life of a method in a run:
    add_flags(parser, METHODS.options(name))  # its own `repair run` flags (a frozen dataclass, registered with it)
    method = Cls(config, model)             # its space, from the model's shape and its options
    method.check_inputs(loaded)             # optional: refuse bad input before any work
    method.prepare(loaded, config, search, probes)  # fit what it needs (probers, vectors, experts) on the search split
    method.artifacts()                      # what workers need of that fit, published in the study
    method.intervention(model)              # one hook for every configuration: rows pick settings
    method.seed(search) / baselines(search) # the configurations it evaluates before and beside the search
    method.attach(model, key) / export(...) # one configuration on a model, in memory or as a checkpoint
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar


def flag(default, kind, help: str, unset=None, **argparse_kwargs):
    """A field of a method's Options that is also its `repair run` flag (`--max-prune` for
    `max_prune`): `kind` parses the flag's text (float, int, str), `help` is its --help line. `unset`:
    what a default of None resolves to in this version, recorded in a run's identity
    (`rundir.unset_defaults`), so a run made under another default is neither resumed nor joined."""
    extra = {} if unset is None else {"unset": unset}
    return field(default=default, metadata={"kind": kind, "help": help, **extra, **argparse_kwargs})


@dataclass(frozen=True)
class NoOptions:
    """The options of a method with no flags of its own."""


def add_flags(group, options: type) -> None:
    """Add a method's Options fields to `repair run` as flags (`group`: an argparse group)."""
    for f in fields(options):
        extra = {k: v for k, v in f.metadata.items() if k not in ("kind", "help", "unset")}
        group.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["kind"], default=f.default,
                           help=f.metadata["help"], **extra)


def options_from(args, options: type):
    """A method's Options from parsed `repair run` arguments."""
    return options(**{f.name: getattr(args, f.name) for f in fields(options)})


class Method(ABC):
    """One repair method. Class attributes name it and size its search; `space` (set in __init__) says
    what its configurations are (keys, bits, features: repair/methods/<name>/space.py)."""

    name: ClassVar[str]  # the --method name and the prefix of its keys ("prune:...")
    seed_phases: ClassVar[tuple[str, ...]]  # the record phases of its seed (the surrogates' first training rows)
    seed_description: ClassVar[str]  # the seed's progress-bar text
    anneal_size: ClassVar[tuple[int, int]] = (256, 1500)  # annealing chains and steps per setting and weight
    keys_per_batch: int = 0  # configurations it evaluates in one batch when more than --batch-masks (0: none)

    budget_share: ClassVar[float] = 0.25  # its weight in --budget-evals beside other methods (--budget-shares overrides)
    changes_weights: ClassVar[bool] = False  # True: its repair is in the exported weights (pruning), no hook to re-attach
    explanation: ClassVar[str] = ""  # the model card's sentence on how the repair acts (after its description)
    setting_flags: ClassVar[tuple[str, ...]] = ()  # the fields of a hooked checkpoint's setting `--layers` etc. may replace

    space: Any
    config: Any  # the run's RunConfig, with this method's share of the budget
    options: Any  # its Options, from config.options (the defaults when the run gave none)

    # ---- its options and its one description (class methods, no model needed) --------------------
    @classmethod
    def options_of(cls, config) -> Any:
        """Its Options (registered with it, repair.methods) in a RunConfig: the defaults when the run gave none."""
        from repair.methods import METHODS

        return config.options.get(cls.name) or METHODS.options(cls.name)()

    @classmethod
    @abstractmethod
    def describe(cls, config: dict) -> str:
        """A configuration in a few words (`config`: its space's `describe(key)`), the one text the
        console summary, the report and the model card show."""

    @classmethod
    def short_name(cls, config: dict) -> str:
        """The configuration's name on the report's plot and tables: the method and what it changes,
        shorter than `describe` ("prune 1 head: 0:8")."""
        return f"{cls.name} {cls.describe(config)}"

    # ---- the run's configuration, before any model loads (class methods) -----------------------
    @classmethod
    def check_config(cls, config, names: tuple[str, ...]) -> None:
        """Refuse, with a UserError naming the flag, this method's flags when they are malformed or given
        to a run that does not run it (`names`: the run's methods, the first one its only one when
        alone). Called for every registered method (default: nothing to check)."""

    @classmethod
    def extra_suites(cls, config) -> tuple[str, ...]:
        """Suites the method reads besides the objectives' (their data files are checked up front)."""
        return ()

    @classmethod
    def surrogates_folder(cls, out: Path) -> Path:
        """Where the method's surrogate rounds are kept in the run folder `out`."""
        return out / cls.name / "surrogates"

    @classmethod
    def probe_scores(cls, run_dir: Path) -> list[dict] | None:
        """Held-out scores of what it fitted, drawn as the report's heat map (default: none)."""
        return None

    # ---- before the search --------------------------------------------------------------------
    @abstractmethod
    def min_budget(self) -> int:
        """The fewest search evaluations its seed and rounds need (a smaller --budget-evals is refused)."""

    def check_inputs(self, loaded) -> None:
        """Refuse, with a UserError, input that would fail later (default: nothing to check)."""

    def probe_sites(self, model) -> dict:
        """Where it reads activations of the search split's association prompts to fit on (site name ->
        modules; default none): the run reads every method's sites in one pass (`ProbePass`)."""
        return {}

    def prepare(self, loaded, config, search, probes) -> None:
        """Fit what the method needs on the search split's suites (`search`, an EvalConfig), kept in the
        run folder (`config.out`) so a rerun reuses it; `probes` (a repair.methods.probe_pass.ProbePass)
        gives its `probe_sites`' activations, read once for the whole run (default: nothing to fit)."""

    def artifacts(self) -> dict:
        """What a worker needs of `prepare`'s fit, as study attributes (default: nothing)."""
        return {}

    def load_artifacts(self, attrs: dict) -> None:
        """A worker's side of `artifacts`: take the run's fit instead of fitting again (default: nothing)."""

    @abstractmethod
    def intervention(self, model):
        """One removable hook (or output transform) on `model` serving every configuration of the space:
        `set_variants(settings)` and `set_rows(rows, shared)` choose each batch row's, and
        `first_layer(variants)` names the first layer they change (repair.methods.rows.PerRowHooks)."""

    # ---- the search ---------------------------------------------------------------------------
    @abstractmethod
    def seed(self, search) -> list[tuple[str, str]]:
        """(key, phase) pairs evaluated before the first surrogate round."""

    @abstractmethod
    def surrogate_params(self, search) -> tuple[dict, dict]:
        """Keyword arguments for surrogate.fit_surrogate: (fairness model's, utility model's)."""

    def every_configuration(self) -> list[str] | None:
        """Every key of a space small enough to score whole: the surrogates rank them all instead of
        annealing, and a round stops once all are evaluated (default None: anneal)."""
        return None

    def anneal_settings(self, search, keys: list[str], fairness) -> list:
        """The settings the bits are annealed under, one sweep each (default: the space's own)."""
        return list(self.space.settings)

    def baselines(self, search) -> dict[str, list[str]]:
        """Named sequences of keys verified and reported beside the search's (default: none)."""
        return {}

    # ---- one configuration ------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model, key: str):
        """`key`'s intervention on `model`, removable (`remove()`)."""

    def bundle(self, key: str) -> tuple[dict, dict, dict | None]:
        """A hooked configuration's (tensors, settings, extra models) for a checkpoint or a stack's part;
        a method that changes weights instead (pruning) raises."""
        raise NotImplementedError(f"{self.name} changes weights: it has no hooked bundle")

    def weights(self, model, key: str) -> dict:
        """A weight-changing method's (`changes_weights`) state dict of `model` with `key` applied,
        for a checkpoint or a stack that holds it."""
        raise NotImplementedError(f"{self.name} adds a hook: it changes no weights")

    @abstractmethod
    def extra_tensors(self, key: str) -> list:
        """The tensors a checkpoint of `key` holds or runs beyond the base model's weights."""

    @abstractmethod
    def export(self, loaded, key: str, target, manifest: dict, card: str):
        """Write `key` as a checkpoint at `target` (checked by reloading it)."""

    # ---- a checkpoint, back in repair.load (class methods: no run, only the checkpoint) -------------
    @classmethod
    def reattach(cls, model, tensors: dict, meta: dict, folder: Path | None):
        """Re-attach an exported configuration (its tensors, its settings decoded from JSON, the
        checkpoint folder for what it keeps beside them) to `model`, removable; ValueError when it
        does not fit. A method that changes weights has nothing to re-attach."""
        raise ValueError(f"{cls.name} checkpoints hold their repair in the weights: nothing to attach")

    @classmethod
    def merge_setting(cls, saved: dict, setting: dict, n_layers: int) -> dict:
        """A checkpoint's saved setting with `setting`'s fields (its `setting_flags`) in place, checked
        (ValueError naming the problem) against a model of `n_layers` decoder layers."""
        return {**saved, **setting}
