"""The `repair run` flags of --method fairsteer: light (no torch), so the command line builds without the method."""
from __future__ import annotations

from dataclasses import dataclass

from repair.methods.base import flag


@dataclass(frozen=True)
class FairSteerOptions:
    steer_labels: str = flag("association", str,
                             "what labels a prompt biased for its probes: 'association' (the model leans to the "
                             "concept's stereotyped groups more than after neutral prompts, default) or 'bbq' (it picks "
                             "the stereotyped wrong answer on BBQ, the published labelling; needs --data-dir)")
