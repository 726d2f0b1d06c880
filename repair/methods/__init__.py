"""One file per repair method: what it fits before searching, which configurations it seeds, its
intervention, its export. The phases they share are in repair.runloop."""
from __future__ import annotations

from repair.methods.experts import Experts
from repair.methods.fairmed import FairMed
from repair.methods.fairsteer import FairSteer
from repair.methods.prune import Prune

METHODS = {"prune": Prune, "fairmed": FairMed, "fairsteer": FairSteer, "experts": Experts}
PLANNED = ("all",)


def build(config, model):
    """The method `config.method` names, for `model`."""
    return METHODS[config.method](config, model)
