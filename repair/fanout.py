"""Sharing the forward below the layers a batch's configurations change.

A held-out or search batch holds every item once per configuration (a variant per row). Below the
first decoder layer a configuration touches, its row computes what the unrepaired model computes;
so a batch runs each item once up to the first layer any of its configurations changes, and there
the rows of those configurations split off while the rest stay shared, and so on up: one trunk
pass, the rows fanning out in stages (`plan`). At each stage's layer the hidden states are
repeated into the stage's rows (`fan_out`), and every decoder layer from the first stage on gets
its per-row arguments (the attention mask, position ids, rotary embeddings: whatever has the
shared batch first) repeated the same way, so each layer runs exactly as on a batch of separate
rows; after the last stage every row is its own, in the batch's order, for the model's head.

The evaluator checks the fan-out against separate rows once, on the model it serves, and does
without it where the two differ (an architecture whose layers take per-row arguments it cannot see).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from repair import arch


@dataclass(frozen=True)
class Stage:
    """A batch from decoder layer `layer` up to the next stage's: `rows`, the batch rows computed
    there, each standing for the rows that share its computation (it is the first of them); `index`,
    the previous stage's row each comes from; `shared`, the first stage's."""

    layer: int
    rows: list[int]
    index: list[int]
    shared: list[int]


def plan(keys: list, firsts: list[int | None], depth: int) -> list[Stage] | None:
    """The stages of a batch whose row i is item `keys[i]` under a variant that first changes decoder
    layer `firsts[i]` (None: none; it splits off at the last layer, for the head). Rows of one item
    share everything below their first change. None when nothing would be shared. The first stage
    (from layer 0) has one row per item; the last holds every row, in the batch's order."""
    firsts = [depth - 1 if f is None else min(f, depth - 1) for f in firsts]
    stages: list[Stage] = []
    for layer in sorted({0, *firsts}):
        # a row's class at `layer`: its item, and itself once its variant has changed something
        classes = [(k, r if f <= layer else None) for r, (k, f) in enumerate(zip(keys, firsts))]
        stand: dict = {}
        for r, c in enumerate(classes):
            stand.setdefault(c, r)
        rows = list(stand.values())
        if stages and len(rows) == len(stages[-1].rows):
            continue  # no class split in two: the same rows stand for the same classes
        if stages:
            at = {r: i for i, r in enumerate(stages[-1].rows)}
            index = [at[before_stand[before[r]]] for r in rows]
            shared = [stages[-1].shared[i] for i in index]
        else:
            index = shared = list(range(len(rows)))
        stages.append(Stage(layer, rows, index, shared))
        before, before_stand = classes, stand
    if len(stages[0].rows) == len(keys):
        return None
    return stages


def row_in_stage(stages: list[Stage], k: int) -> list[int]:
    """Each batch row's row in stage `k` (the one computing for it there)."""
    pos = list(range(len(stages[-1].rows)))
    for stage in reversed(stages[k + 1:]):
        pos = [stage.index[p] for p in pos]
    return pos


@contextmanager
def fan_out(model, stages: list[Stage]):
    """Within the block, forwards of `len(stages[0].rows)` rows fan out at the stages' layers (see
    `plan`), ending in a batch of `len(stages[-1].rows)` rows."""
    layers = arch.decoder_layers(model)
    index = [torch.tensor(s.index) for s in stages]
    shared = [torch.tensor(s.shared) for s in stages]
    n_shared = len(stages[0].rows)
    stage_of = [max(k for k, s in enumerate(stages) if s.layer <= j) for j in range(len(layers))]
    expanded: dict = {}  # (id of a per-forward argument, stage) -> (it, its rows repeated): the layers share them

    def repeat(value, k: int):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == n_shared:
            key = (id(value), k)
            if key not in expanded:
                expanded[key] = (value, value[shared[k].to(value.device)])
            return expanded[key][1]
        if isinstance(value, tuple):
            return tuple(repeat(v, k) for v in value)
        if isinstance(value, dict):
            return {name: repeat(v, k) for name, v in value.items()}
        return value

    def hook(j: int):
        k = stage_of[j]
        starts = stages[k].layer == j and k > 0

        def expand(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if starts:
                hidden = hidden[index[k].to(hidden.device)]  # a sharded model's layers sit on several devices
            kwargs = {name: repeat(v, k) for name, v in kwargs.items() if name != "hidden_states"}
            if args:
                return (hidden, *(repeat(a, k) for a in args[1:])), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return expand

    first = stages[1].layer
    handles = [layers[j].register_forward_pre_hook(hook(j), with_kwargs=True, prepend=True)
               for j in range(first, len(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        expanded.clear()
