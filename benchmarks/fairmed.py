"""Generation speed with and without the FairMed neutralizer: same model, same prompts, same run.

    python benchmarks/fairmed.py --checkpoint runs/fairmed/checkpoint [--layers 0,5,9] [--tokens 32]
    python benchmarks/fairmed.py --probers RUN_DIR/fairmed/probers.safetensors --layers 23,24,25,26,28,29

Loads a hooked checkpoint with `repair.load` (or `--model` with the probers a run or `repair probe`
fitted, `--probers`), then times greedy generation (KV cache on, batch of prompts) alternately with
the neutralizer attached and removed, `--reps` times each, and prints tokens per second for both and
their ratio (the medians). `--layers` (with --lam/--steps/--gate) times another setting with the
checkpoint's probers, e.g. the most layers a run may treat.
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
    parser.add_argument("--probers", type=Path, default=None, help="a probers.safetensors (with --model, --layers)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="neutral")
    args = parser.parse_args()
    if args.probers is not None:
        from repair.methods.fairmed.probers import Probers
        from repair.models import ModelSpec, load_model

        loaded = load_model(ModelSpec(args.model))
        model, tokenizer, probers = loaded.model, loaded.tokenizer, Probers.load(args.probers)
        setting = NeutralizerSetting((), args.lam, args.steps, args.gate, args.target)
    else:
        model, tokenizer = repair.load(args.checkpoint)
        hook = model.repair_interventions[0]
        setting, probers = hook.settings[0], hook.probers
        hook.remove()
    if args.layers:
        setting = NeutralizerSetting(tuple(int(l) for l in args.layers.split(",")), args.lam, args.steps, args.gate,
                                     setting.target)
    if not setting.layers:
        parser.error("--probers needs --layers")
    print(f"setting: layers {list(setting.layers)}, lambda {setting.lam:g}, {setting.steps} steps, gate {setting.gate:g}, "
          f"target {setting.target}")
    compare(model, tokenizer, lambda m: Neutralizer(m, probers, [setting]), "neutralizer", args.tokens, args.reps)


if __name__ == "__main__":
    main()
