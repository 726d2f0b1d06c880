"""The run directory: its resolved configuration decides whether a rerun resumes or is refused."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from repair.errors import UserError
from repair.io import write_json_atomic
from repair.models import ModelSpec, model_numbers


RECORDS = 2  # how records are keyed: 2 = "METHOD:CONFIG" and "base" (1, unrecorded: a prune mask's hex alone)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's results: the settings every method shares, and under `options`
    each method's own (name -> its frozen Options, from its flags; a method not named takes its
    defaults). The CLI maps `repair run` flags onto it one to one."""

    out: Path
    model: ModelSpec = field(default_factory=ModelSpec)
    method: str = "prune"  # one method, a comma list of them, or "all" (repair.methods)
    data_dir: Path | None = None
    fairness: str = "association-neutral"  # the stereotype part; kl_uniform is shown beside it
    utility: str = "text"
    budget_evals: int = 120  # with several methods: shared by them, `budget_shares` or the default split
    budget_shares: str | None = None  # "prune=2,fairmed=1": each method's weight (None: each method's budget_share)
    stack: bool = False  # several methods: also evaluate the best of each pair of methods applied together
    rounds: int = 2
    per_round: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)  # method name -> its Options (repair.methods.base)
    max_utility_loss: float = 0.05
    max_kl_uniform_rise: float = 0.02  # guard: kl_uniform's paired relative change may not end above this
    max_q_drift: float | None = None  # guard: KL(q_repaired || q_base) bound (None: the unrepaired model's q_spread)
    knockouts: bool = False
    baselines: tuple[str, ...] = ()
    search_limit: int = 24  # prompts per attribute / items per category in the search split (several frames)
    search_ppl_tokens: int = 512
    report_limit: int | None = None  # None: every item of the held-out split
    report_ppl_tokens: int = 2048
    panel_bbq_limit: int = 60  # BBQ items per category on the report split's transfer panel (with --data-dir)
    verify_top: int = 6
    bbq_mode: str = "cloze"
    batch_masks: int = 8
    storage: str | None = None
    study: str | None = None
    workers_only: bool = False  # leave every evaluation to `repair worker` processes
    heartbeat: int = 10  # seconds between heartbeats; a trial is stale after three missed ones
    seed: int = 0
    export_all: bool = False  # several methods: also export each method's best to checkpoints/METHOD

    @property
    def method_names(self) -> tuple[str, ...]:
        """The methods `method` names, in the registry's order (the one parser of --method: repair.methods)."""
        from repair.methods import method_names

        return method_names(self.method)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    @property
    def study_name(self) -> str:
        return self.study or f"repair-{self.out.resolve().name}"

    def identity(self) -> dict:
        """What must match for a rerun to resume or a worker to join (not where records are stored):
        the configuration, and under "numbers" what the model computes with (`models.model_numbers`:
        the weights' fingerprint, device type, resolved dtype), since a bfloat16 GPU run or another
        checkpoint behind the same path gives other numbers for the same flags."""
        from repair.methods import METHODS

        skip = ("out", "storage", "study", "batch_masks", "workers_only", "heartbeat", "export_all", "options")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for name in METHODS:  # every method's options at the top level, as when they were fields here
            own = asdict(self.options.get(name) or METHODS.options(name)())
            assert not set(own) & set(d), f"{name}'s options reuse a name of the run's: {set(own) & set(d)}"
            d.update(own)
        d["unset"] = unset_defaults(self.options)
        d["model"] = {"model": self.model.model, "trust_remote_code": self.model.trust_remote_code}
        d["numbers"] = model_numbers(self.model)
        d["records"] = RECORDS
        return json.loads(json.dumps(d, default=str))


def unset_defaults(options: Mapping) -> dict:
    """What the methods' unset flags (None) resolve to in this version (`methods.base.flag`'s `unset`),
    by flag: a run's identity records it, so a run made when a default differed is not continued under
    another (a resumed run or a worker would compute its configurations with other settings)."""
    from repair.methods import METHODS

    out = {}
    for name in METHODS:
        own = options.get(name) or METHODS.options(name)()
        out.update({f.name: f.metadata["unset"] for f in fields(own) if "unset" in f.metadata and getattr(own, f.name) is None})
    return out


def pop_options(identity: dict) -> dict:
    """Each method's Options out of an identity (`RunConfig.identity` puts their fields at its top level),
    removed from it: what a worker rebuilds the run's RunConfig with."""
    from repair.methods import METHODS

    out = {}
    for name in METHODS:
        options = METHODS.options(name)
        out[name] = options(**{f.name: identity.pop(f.name) for f in fields(options) if f.name in identity})
    return out


def check_numbers(held: dict | None, ours: dict, holder: str, this: str, fix: str, old_fix: str) -> None:
    """Refuse, in one line naming what differs, to add records computed with other weights, another
    device type or dtype to a run: `held` is the run's "numbers", `ours` this process's."""
    if not held:
        raise UserError(f"{holder} was made by an older fairness-repair that did not record the model's "
                        f"fingerprint, device and dtype, so its records cannot be checked against this {this} "
                        f"({old_fix})")
    differ = [name for key, name in (("fingerprint", "model weights"), ("device", "device"), ("dtype", "dtype"))
              if held.get(key) != ours.get(key)]
    if differ:
        raise UserError(f"{holder} holds a run of model fingerprint {held['fingerprint'][:12]} on "
                        f"{held['device']}/{held['dtype']}; this {this} has {ours['fingerprint'][:12]} on "
                        f"{ours['device']}/{ours['dtype']} (different {' and '.join(differ)}: {fix})")


def prepare(config: RunConfig, resolved: dict) -> bool:
    """Create or reopen the run directory. Returns True when resuming an earlier run.

    An existing directory with a different configuration is refused rather than mixed.
    """
    out = config.out
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file, not a directory (choose another --out)")
    saved = out / "config.json"
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text())["identity"]
        except (ValueError, KeyError):
            raise UserError(f"{saved} is not a run configuration (choose another --out)") from None
        current = config.identity()
        check_numbers(previous.get("numbers"), current["numbers"], str(out), "process",
                      "rerun with the same --model/--device/--dtype to resume, or choose another --out",
                      "choose another --out")
        if previous.get("records") != RECORDS:
            raise UserError(f"{out} holds a run made by an older fairness-repair whose records are keyed by head mask "
                            "alone, which this version cannot resume (choose another --out; that run's checkpoint "
                            "and report stay as they are)")
        if previous.get("unset") != current["unset"]:
            raise UserError(f"{out} holds a run made when unset flags meant {previous.get('unset', 'older defaults')}; "
                            f"this version means {current['unset']} and would compute other configurations (choose "
                            "another --out, or resume it with the version that made it)")
        if previous != current:
            diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise UserError(f"{out} holds a run with a different configuration ({', '.join(diff)} differ): "
                            "rerun with the same arguments to resume, or choose another --out")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a run directory (choose an empty or new --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output directory {out}: {exc.strerror or exc} (choose a writable --out)") from None
    write_json_atomic(saved, {"identity": config.identity(), "command": sys.argv, "cwd": os.getcwd(), **resolved})
    return False
