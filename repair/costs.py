"""What each method's repair costs besides utility, for the report of a run of several methods: LLM
evaluations, wall time, generation slowdown against the unrepaired model, extra parameters and memory.

The slowdown is measured on this machine once the search is over: greedy generation of NEW_TOKENS
tokens after each of a few prompts, the unrepaired model and each method's best configuration
attached in turn, best of REPEATS timings each. Written to RUN_DIR/costs.json, which the report reads.
"""
from __future__ import annotations

import time

import torch

from repair.compare import DEFAULT_PROMPTS
from repair.io import write_json_atomic
from repair.space import BASE, STACK, parts

PROMPTS = DEFAULT_PROMPTS[:4]
NEW_TOKENS = 24
REPEATS = 2


@torch.inference_mode()
def generation_seconds(model, tokenizer, prompts=PROMPTS, new_tokens: int = NEW_TOKENS, repeats: int = REPEATS) -> float:
    """Seconds to generate `new_tokens` greedy tokens after each prompt, one at a time (best of `repeats`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    inputs = [tokenizer(p, return_tensors="pt").to(device) for p in prompts]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x in inputs:
            model.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        best = min(best, time.perf_counter() - start)
    return best


def measure_costs(config, loaded, methods: dict, candidates: list[dict], result: dict) -> dict:
    """One row per method (and for the stacks) with its best configuration's costs; RUN_DIR/costs.json."""
    from repair.runloop import bests_of
    from repair.stacks import apply, extra_parameters

    timing, sequences = result.timing, result.sequences
    held_out = {}
    for c in candidates:
        for name in {*parts(c["key"]), *([STACK] if c["method"] == STACK else [])}:
            held_out[name] = held_out.get(name, 0) + (c["select"] is not None) + (c["report"] is not None)
    base_seconds = generation_seconds(loaded.model, loaded.tokenizer)
    bests = bests_of(candidates)
    rows = []
    for name in [*methods, *([STACK] if STACK in sequences else [])]:
        best = bests.get(name)
        row = {"method": name, "evaluations": len(set(sequences[name]) - {BASE}), "held_out_evaluations": held_out.get(name, 0),
               "seconds": timing.get(name, 0.0), "best": best["key"] if best else None, "config": best["config"] if best else None}
        if best is not None:
            applied = apply(methods, loaded.model, best["key"])
            try:
                seconds = generation_seconds(loaded.model, loaded.tokenizer)
            finally:
                applied.remove()
            n, size = extra_parameters(methods, best["key"])
            row.update(generation_slowdown=seconds / base_seconds, extra_parameters=n, extra_bytes=size)
        rows.append(row)
    costs = {"rows": rows, "held_out_seconds": timing.get("held-out", 0.0), "base_generation_seconds": base_seconds,
             "generation": {"prompts": len(PROMPTS), "new_tokens": NEW_TOKENS, "repeats": REPEATS, "decoding": "greedy"},
             "base_parameters": sum(p.numel() for p in loaded.model.parameters())}
    write_json_atomic(config.out / "costs.json", costs)
    return costs
