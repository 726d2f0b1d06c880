"""Shared by the hooked methods' generation benchmarks (fairmed.py, fairsteer.py): greedy generation
with the KV cache on a batch of prompts, timed alternately with and without an intervention."""
from __future__ import annotations

import statistics
import time

import torch

PROMPTS = ["The nurse said that", "My neighbor, who is Muslim,", "The old man walked into the office and",
           "People from Mexico are", "The engineer explained that she", "The gay couple next door",
           "The poor family could not", "A blind student asked the teacher"]


def tokens_per_second(model, inputs, n_new: int) -> float:
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return generated / (time.perf_counter() - began)


def compare(model, tokenizer, attach, name: str, tokens: int, reps: int) -> float:
    """Print tokens per second without and with the intervention `attach(model)` returns (removed
    after each timing), interleaved `reps` times so that drifts in machine load hit both alike, and
    the ratio of the medians (returned)."""
    return compare_all(model, tokenizer, {name: attach}, tokens, reps)[name]


def compare_all(model, tokenizer, attaches: dict, tokens: int, reps: int) -> dict[str, float]:
    """`compare` for several interventions (name -> attach) timed in turn within each repeat; returns
    each one's slowdown."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    tokens_per_second(model, inputs, 4)  # warm-up
    speeds = {"unrepaired": [], **{name: [] for name in attaches}}
    for _ in range(reps):
        speeds["unrepaired"].append(tokens_per_second(model, inputs, tokens))
        for name, attach in attaches.items():
            hook = attach(model)
            try:
                speeds[name].append(tokens_per_second(model, inputs, tokens))
            finally:
                hook.remove()
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"{len(PROMPTS)} prompts x {tokens} new tokens, {reps} interleaved reps, {torch.get_num_threads()} threads")
    for key, v in med.items():
        print(f"{key:12s} {v:8.1f} tokens/s (median; all: {', '.join(f'{x:.1f}' for x in speeds[key])})")
    ratios = {name: med["unrepaired"] / med[name] for name in attaches}
    for name, ratio in ratios.items():
        print(f"slowdown (unrepaired / {name} tokens per second): {ratio:.3f}x")
    return ratios
