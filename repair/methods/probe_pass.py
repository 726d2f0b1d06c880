"""One pass over the search split's association prompts for every method of a run that fits on
activations (FairMed's probers read MLP outputs, FairSteer's probes the residual stream): the prompts'
group distributions are scored once and every site is read in the same forwards, instead of each
method running the 4,800 prompts through the model for itself. Computed on the first request, only
when a method's own cache does not already hold what it fits."""
from __future__ import annotations


class ProbePass:
    """`data(site)`: the ProbeData of one site (repair.methods.fairmed.probers.probe_data_at), every
    site of the run measured together on the first request; each is handed out once, then dropped
    (a site's activations are about 0.9 GB on SmolLM2)."""

    def __init__(self, loaded, eval_config, sites: dict):
        self.loaded, self.eval_config, self.sites = loaded, eval_config, dict(sites)
        self._data: dict | None = None

    def data(self, site: str):
        from repair.methods.fairmed.probers import probe_data_at

        if site not in self.sites:
            raise KeyError(f"no method of this run asked for activations at {site!r} (asked: {', '.join(self.sites)})")
        if self._data is None:
            self._data = probe_data_at(self.loaded, self.eval_config, self.sites)
        if site not in self._data:
            raise RuntimeError(f"the {site!r} activations were handed out already")
        return self._data.pop(site)
