"""Generation speed with and without the FairMed neutralizer: same model, same prompts, same run.

    python benchmarks/fairmed.py --checkpoint runs/fairmed/checkpoint [--layers 0,5,9] [--tokens 32]

Loads a hooked checkpoint with `repair.load`, then times greedy generation (KV cache on, batch of
prompts) alternately with the neutralizer attached and removed, `--reps` times each, and prints
tokens per second for both and their ratio (the medians). `--layers` (with --lam/--steps/--gate)
times another setting with the checkpoint's probers, e.g. the most layers a run may treat.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repair  # noqa: E402
from benchmarks.generation_speed import compare  # noqa: E402
from repair.methods.fairmed.neutralizer import Neutralizer, NeutralizerSetting  # noqa: E402


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
    print(f"setting: layers {list(setting.layers)}, lambda {setting.lam:g}, {setting.steps} steps, gate {setting.gate:g}, "
          f"target {setting.target}")
    compare(model, tokenizer, lambda m: Neutralizer(m, probers, [setting]), "neutralizer", args.tokens, args.reps)


if __name__ == "__main__":
    main()
