"""A method's fitted tensors (FairMed's probers, FairSteer's vectors) as a study attribute, so that
workers evaluate with the run's own, checked by sha256."""
from __future__ import annotations

import base64
import hashlib

from repair.errors import UserError


def pack(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "safetensors": base64.b64encode(data).decode()}


def unpack(attrs: dict, name: str, what: str) -> bytes:
    """The bytes stored under `artifact:NAME` in the study's attributes; one line when they are
    missing (the run has not published them yet) or do not match their sha256."""
    stored = attrs.get(f"artifact:{name}")
    if not stored:
        raise UserError(f"the run has not published its {what} yet (start the worker after the run's "
                        "probing step, or let it wait with a larger --max-idle)")
    data = base64.b64decode(stored["safetensors"])
    if hashlib.sha256(data).hexdigest() != stored["sha256"]:
        raise UserError(f"the run's {what} in the study do not match their sha256 (restart the run)")
    return data
