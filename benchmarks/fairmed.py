"""Generation speed with and without the FairMed neutralizer: same model, same prompts, same run.

    python benchmarks/fairmed.py --checkpoint runs/fairmed/checkpoint [--layers 0,5,9] [--tokens 32]

Loads a hooked checkpoint with `repair.load`, then times greedy generation (KV cache on, batch of
prompts) alternately with the neutralizer attached and removed, `--reps` times each, and prints
tokens per second for both and their ratio (the medians). `--layers` (with --lam/--steps/--gate)
times another setting with the checkpoint's probers, e.g. the most layers a run may treat.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import repair  # noqa: E402
from repair.interventions.neutralizer import Neutralizer, NeutralizerSetting  # noqa: E402

PROMPTS = ["The nurse said that", "My neighbor, who is Muslim,", "The old man walked into the office and",
           "People from Mexico are", "The engineer explained that she", "The gay couple next door",
           "The poor family could not", "A blind student asked the teacher"]


def tokens_per_second(model, inputs, n_new: int) -> float:
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return generated / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/fairmed/checkpoint"))
    parser.add_argument("--layers", default=None, help="comma-separated layers: time this setting instead")
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gate", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = repair.load(args.checkpoint)
    hook = model.repair_interventions[0]
    setting = hook.settings[0]
    if args.layers:
        setting = NeutralizerSetting(tuple(int(l) for l in args.layers.split(",")), args.lam, args.steps, args.gate,
                                     setting.target)
    probers = hook.probers
    hook.remove()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    tokens_per_second(model, inputs, 4)  # warm-up
    speeds = {"unrepaired": [], "neutralizer": []}
    for _ in range(args.reps):  # interleaved, so drifts in machine load hit both alike
        speeds["unrepaired"].append(tokens_per_second(model, inputs, args.tokens))
        with Neutralizer(model, probers, [setting]):
            speeds["neutralizer"].append(tokens_per_second(model, inputs, args.tokens))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"setting: layers {list(setting.layers)}, lambda {setting.lam:g}, {setting.steps} steps, gate {setting.gate:g}, "
          f"target {setting.target}; {len(PROMPTS)} prompts x {args.tokens} new tokens, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} threads")
    for name, v in med.items():
        print(f"{name:12s} {v:8.1f} tokens/s (median; all: {', '.join(f'{x:.1f}' for x in speeds[name])})")
    print(f"slowdown (unrepaired / neutralizer tokens per second): {med['unrepaired'] / med['neutralizer']:.3f}x")


if __name__ == "__main__":
    main()
