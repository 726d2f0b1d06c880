"""One pass over the search split's association prompts for every method of a run that fits on
activations (FairMed's probers read MLP outputs, FairSteer's probes the residual stream): the prompts'
group distributions are scored once and every site is read in the same forwards, instead of each
method running the 4,800 prompts through the model for itself.

The pass is kept in the run folder as one file, `probe-pass.npz` (every site's activations and the
rows' labels), with `probe-pass.json` beside it: the file's sha256 and what it was measured on (the
model as loaded, the suite data's sha256, the split, the positions read and the sites). A resumed run
reads it back, checked, instead of measuring it again; each method records the pass's sha256 with its
fit and refits when the pass it was fitted on has been replaced. Measured on the first request, only
when a method's own fit is missing or stale."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repair.errors import UserError
from repair.io import sha256_file, write_json_atomic

FILE = "probe-pass.npz"
RECORD = "probe-pass.json"


class ProbePass:
    """`data(site)`: the ProbeData of one site (repair.methods.fairmed.probers.probe_data_at), every
    site of the run measured together on the first request and kept in `folder` (see the module
    docstring); `site(name)`: what a method needs of one site. Without `folder` nothing is kept."""

    def __init__(self, loaded, eval_config, sites: dict, folder: Path | None = None):
        self.loaded, self.eval_config, self.sites = loaded, eval_config, dict(sites)
        self.folder = None if folder is None else Path(folder)
        self._data: dict | None = None  # measured by this process: handed out once each, then dropped
        self._checked = False  # the kept file's sha256 has been checked against its record
        self._key: dict | None = None

    def site(self, name: str) -> "PassSite":
        if name not in self.sites:
            raise KeyError(f"no method of this run asked for activations at {name!r} (asked: {', '.join(self.sites)})")
        return PassSite(self, name)

    # ---- the kept file ----------------------------------------------------------------------
    def key(self) -> dict:
        """What the pass depends on: FairMed's cache key (model, suite data, split, attributes, positions)
        and the sites read, with their module counts."""
        from repair.methods.fairmed.cache import data_key
        from repair.suites.association import load_data

        if self._key is None:
            self._key = {**data_key(self.loaded, self.eval_config, load_data()[1]),
                         "sites": {name: len(modules) for name, modules in sorted(self.sites.items())}}
        return self._key

    def recorded(self) -> str | None:
        """The sha256 of the pass kept in the folder (from its record: nothing is read or measured), None
        when none is kept; a UserError when the record is of another key or unreadable."""
        if self.folder is None or not (self.folder / RECORD).is_file():
            return None
        path = self.folder / RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            sha, key = record["sha256"], record["key"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a readable probe-pass record; delete it and {FILE} to measure the pass again") from None
        if key != self.key():
            from repair.methods.fairmed.cache import measured_for_another

            raise UserError(f"{self.folder / FILE} {measured_for_another(key, self.key())}; delete it and {RECORD} to "
                            "measure the pass again")
        return sha

    def sha256(self) -> str:
        """The pass's sha256: the kept one, or that of the file written after measuring it now."""
        if self.folder is None:
            raise ValueError("a probe pass kept in no folder has no sha256")
        sha = self.recorded()
        if sha is None or not (self.folder / FILE).is_file():
            self._measure()
            sha = self.recorded()
        return sha

    def data(self, site: str):
        """The ProbeData of `site`: measured now (and kept) when the folder holds no pass, else read back."""
        from repair.methods.fairmed.cache import read_npz

        self.site(site)
        if self._data is None and (self.recorded() is None or not (self.folder / FILE).is_file()):
            self._measure()
        if self._data is not None:
            if site not in self._data:
                raise RuntimeError(f"the {site!r} activations were handed out already")
            return self._data.pop(site)
        path = self.folder / FILE
        if not self._checked:
            if sha256_file(path) != self.recorded():
                raise UserError(f"{path} is not the file that was measured (its sha256 differs from {RECORD}'s); "
                                f"delete both to measure the pass again")
            self._checked = True
        try:
            with np.load(path, allow_pickle=False) as z:
                return read_npz(z, json.loads(str(z["meta"])), f"activations.{site}")
        except (OSError, ValueError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
            raise UserError(f"{path} is not a readable probe pass ({type(exc).__name__}); delete it and {RECORD} "
                            "to measure the pass again") from None

    def _measure(self) -> None:
        """Every site in one pass (probe_data_at); kept in the folder: the file, then its record."""
        from repair.methods.fairmed.probers import probe_data_at

        self._data = probe_data_at(self.loaded, self.eval_config, self.sites)
        self._checked = True
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / FILE
        (self.folder / RECORD).unlink(missing_ok=True)  # no record names a file while it is being replaced
        save(path, self._data)
        write_json_atomic(self.folder / RECORD, {"sha256": sha256_file(path), "key": self.key()})


@dataclass(frozen=True)
class PassSite:
    """One site of a ProbePass, as a method's fit sees it."""

    probes: ProbePass
    name: str

    def recorded(self) -> str | None:
        return self.probes.recorded()

    def sha256(self) -> str:
        return self.probes.sha256()

    def data(self):
        return self.probes.data(self.name)


def save(path: Path, data: dict) -> None:
    """Every site's ProbeData (they share their rows) as one .npz, atomically: `activations.SITE` per
    site, the rows' fields once (repair.methods.fairmed.cache.write_npz)."""
    from repair.methods.fairmed.cache import write_npz

    write_npz(path, {f"activations.{name}": d.activations for name, d in data.items()}, next(iter(data.values())), {})
