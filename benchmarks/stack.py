"""Generation speed of a stacked checkpoint against each of its parts alone: same model, same prompts,
same run.

    python benchmarks/stack.py --checkpoint runs/all/checkpoint [--tokens 32] [--reps 5]

Loads a stack checkpoint (`repair run --method all` exports one when it chooses a stack) with
`repair.load` and takes its interventions off, then times greedy generation (KV cache on, a batch of
prompts) unrepaired, with each hooked part alone and with the whole stack, interleaved `--reps`
times. Prints each slowdown (the ratio of the medians) and the stack's against its slowest part's
plus 5%, the bound issue 20 sets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repair  # noqa: E402
from benchmarks.generation_speed import compare_all  # noqa: E402
from repair.load import INTERVENTIONS, attach  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/all/checkpoint"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(args.checkpoint / INTERVENTIONS), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("method") != "stack":
        sys.exit(f"{args.checkpoint} holds a {meta.get('method', 'pruned')} checkpoint, not a stack")
    tensors = load_file(str(args.checkpoint / INTERVENTIONS))
    model, tokenizer = repair.load(args.checkpoint)
    for hook in model.repair_interventions:
        hook.remove()

    def part(name):
        prefix = f"{name}/"
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        settings = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        return lambda m: attach(m, name, own, settings, args.checkpoint)

    parts = json.loads(meta["parts"])
    attaches = {name: part(name) for name in parts}
    attaches["stack"] = lambda m: attach(m, "stack", tensors, meta, args.checkpoint)
    ratios = compare_all(model, tokenizer, attaches, args.tokens, args.reps)
    slowest = max(parts, key=ratios.get)
    bound = ratios[slowest] * 1.05
    print(f"stack {ratios['stack']:.3f}x against its slowest part ({slowest}, {ratios[slowest]:.3f}x) plus 5%: "
          f"{bound:.3f}x ({'within' if ratios['stack'] <= bound else 'beyond'})")


if __name__ == "__main__":
    main()
