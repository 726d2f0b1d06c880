"""Configuration keys, shared by every method's configuration space (each method's own space, what its
configurations are as keys (records), bits (annealing) and features (surrogates), is in
repair/methods/<name>/space.py).

Every configuration is a text key `METHOD:BODY`; the unrepaired model is `base` in every space, so
one study holds every method's records and the unrepaired model is evaluated once. Annealing flips
`n_bits` free bits (1 = untouched: a kept head, an untreated layer), at most `max_changed` of them
0; a space with settings beyond the bits (FairMed's lambda, steps, gate) anneals the bits once per
setting (`settings`), and its surrogate features are the bits followed by the setting's features.
"""
from __future__ import annotations

BASE = "base"
MIN_SAMPLES = 20  # fewer sampled configurations than this leave the surrogates nothing to learn from
STACK = "stack"  # a configuration made of several methods' configurations, applied together


def method_of(key: str) -> str | None:
    """The method a key belongs to ("stack" for a stacked one); None for the unrepaired model."""
    return None if key == BASE else key.partition(":")[0]


def parts(key: str) -> dict[str, str]:
    """The single-method keys a configuration is made of, by method: none for the unrepaired model,
    one for a method's own configuration, one per method for a stack (`stack:KEY+KEY`)."""
    if key == BASE:
        return {}
    method, _, body = key.partition(":")
    if method != STACK:
        return {method: key}
    return {method_of(k): k for k in body.split("+")}


def stack_key(keys, order) -> str:
    """The key of `keys` (of different methods, in no particular order) applied together; the parts
    are sorted by `order` (the methods' names) so the same stack always has the same key."""
    keys = sorted(keys, key=lambda k: list(order).index(method_of(k)))
    if len({method_of(k) for k in keys}) != len(keys) or len(keys) < 2 or BASE in keys:
        raise ValueError(f"a stack takes configurations of two or more different methods, got {keys}")
    return f"{STACK}:{'+'.join(keys)}"
