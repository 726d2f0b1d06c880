"""Stacked repairs: configurations of different methods applied to one model together (a pruned head
mask with a steering vector, a neutralizer beside the experts). None of the source methods does this.

A stack is a key `stack:KEY+KEY` (repair.space.parts); in the search each part's intervention gets
its own part for a stack's rows, so stacks are evaluated on the same batched forwards as anything
else. Exported, a stack is one checkpoint: the changed weights when a part changes weights (pruning), and every
hooked part's tensors, prefixed by its method, in one `interventions.safetensors`.
"""
from __future__ import annotations

import json


from repair.applied import Applied
from repair.export import write_checkpoint
from repair.load import INTERVENTIONS
from repair.space import STACK, parts


def apply(methods: dict, model, key: str) -> Applied:
    """`key` (any method's configuration, a stack or the unrepaired model) attached to `model`."""
    hooks = []
    try:
        for name, part in parts(key).items():
            hooks.append(methods[name].attach(model, part))
    except BaseException:
        Applied(model, hooks).remove()
        raise
    return Applied(model, hooks)


def extra_parameters(methods: dict, key: str) -> tuple[int, int]:
    """(parameters, bytes) a checkpoint of `key` holds or runs beyond the base model's weights."""
    tensors = [t for name, part in parts(key).items() for t in methods[name].extra_tensors(part)]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def export_stack(methods: dict, loaded, key: str, target, manifest: dict, card: str):
    """One checkpoint of a stack: the changed weights if a part changes weights (pruning), the hooked parts' tensors and
    settings (names prefixed `METHOD/`) and their models; checked by reloading like any other."""
    model = loaded.model
    found = parts(key)
    changed = [m for m in found if methods[m].changes_weights]
    assert len(changed) <= 1, f"two parts change weights ({', '.join(changed)}): a stack holds one"
    state = methods[changed[0]].weights(model, found[changed[0]]) if changed else model.state_dict()
    hooked = [m for m in found if m not in changed]
    tensors, meta, models = {}, {"method": STACK, "parts": json.dumps(hooked)}, {}
    for name in hooked:
        t, m, extra = methods[name].bundle(found[name])
        tensors.update({f"{name}/{k}": v for k, v in t.items()})
        meta.update({f"{name}/{k}": json.dumps(v) for k, v in m.items()})
        models.update(extra or {})

    def expected(ids):
        applied = apply(methods, model, key)
        try:
            return applied.logits(ids)
        finally:
            applied.remove()

    return write_checkpoint(loaded, state, None, target, manifest, card, {INTERVENTIONS: (tensors, meta)}, expected, models)
