"""Named points where the crash-safety tests kill the process, instead of racing a timer.

`REPAIR_KILL_AT=stage:n` sends SIGKILL to this process the n-th time `reached(stage)` runs;
`REPAIR_FAILPOINT_LOG=file` appends every stage reached, so a test knows how many points each stage
has and can pick one at random. Both are unset in normal use, where `reached` does nothing.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()


def reached(stage: str) -> None:
    log = os.environ.get("REPAIR_FAILPOINT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(stage + "\n")
    spec = os.environ.get("REPAIR_KILL_AT")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name == stage:
        _hits[stage] += 1
        if _hits[stage] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
