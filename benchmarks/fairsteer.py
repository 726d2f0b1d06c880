"""Generation speed with and without FairSteer's steering: same model, same prompts, same run.

    python benchmarks/fairsteer.py --checkpoint runs/fairsteer/checkpoint [--layer 14 --alpha 0.3 --threshold 0.5]

Loads a hooked checkpoint with `repair.load`, then times greedy generation (KV cache on, batch of
prompts) alternately with the steering attached and removed, `--reps` times each, and prints tokens
per second for both and their ratio (the medians). `--layer`/`--alpha`/`--threshold` time another
setting with the checkpoint's probes and vectors (`--threshold always`: no gate).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repair  # noqa: E402
from benchmarks.generation_speed import compare  # noqa: E402
from repair.methods.fairsteer.steerer import SteerSetting, Steerer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/fairsteer/checkpoint"))
    parser.add_argument("--layer", type=int, default=None, help="time this layer's steering instead")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--threshold", default="0.5", help="a probability, or 'always'")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = repair.load(args.checkpoint)
    hook = model.repair_interventions[0]
    setting = hook.settings[0]
    if args.layer is not None:
        setting = SteerSetting(args.layer, args.alpha, None if args.threshold == "always" else float(args.threshold))
    steering = hook.steering
    hook.remove()
    if setting.layer is None:
        sys.exit("the checkpoint steers no layer (the run chose the unrepaired model): give --layer")
    print(f"setting: layer {setting.layer}, alpha {setting.alpha:g}, "
          f"{'always on' if setting.threshold is None else f'threshold {setting.threshold:g}'}")
    compare(model, tokenizer, lambda m: Steerer(m, steering, [setting]), "steering", args.tokens, args.reps)


if __name__ == "__main__":
    main()
