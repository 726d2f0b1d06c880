"""Decoding-time experts: generation speed against the unrepaired model, and the cost of a training step.

    python benchmarks/experts.py --checkpoint runs/experts/checkpoint   # the run's bundle (experts as large as the target)
    python benchmarks/experts.py --tiny                                 # a random target, experts a tenth of its size
    python benchmarks/experts.py --training                             # full fine-tuning vs the top layers only
    python benchmarks/experts.py --trunk                                # full copies vs tops over the shared trunk, K = 2..8

Generation is greedy with the KV cache (the experts keep their own caches), timed alternately with
and without the experts (benchmarks/generation_speed.py). With experts as large as the target a
token costs three forwards, so about 3x is the floor; the method is meant for small experts beside
a large target, which `--tiny` measures on random models of the same vocabulary (sizes printed).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import compare  # noqa: E402


def bundle(args) -> None:
    import repair

    model, tokenizer = repair.load(args.checkpoint)
    transform = model.repair_interventions[0]
    transform.remove()  # attached and removed in turn by compare()
    print(f"{args.checkpoint}: {transform.describe()}")
    compare(model, tokenizer, lambda m: transform.attach(), "experts", args.tokens, args.reps)


def tiny(args) -> None:
    """A random Llama target and random experts a tenth of its parameters, sharing a 49,152-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from repair.methods.experts.transform import ExpertSetting, ExpertsTransform
    from repair.models import load_model, ModelSpec

    tokenizer = load_model(ModelSpec()).tokenizer

    def build(hidden, layers, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          tie_word_embeddings=True, max_position_embeddings=2048)
        return LlamaForCausalLM(cfg).eval()

    target = build(1024, 16, 0)
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for name, (hidden, layers) in {"same size": (1024, 16), "a tenth": (320, 6)}.items():
        experts = [build(hidden, layers, s) for s in (1, 2)]
        print(f"\ntarget {size(target) / 1e6:.0f}M parameters, each expert {size(experts[0]) / 1e6:.0f}M ({name})")
        transform = ExpertsTransform(target, *experts, [ExpertSetting(1.0)])
        compare(target, tokenizer, lambda m: transform.attach(), "experts", args.tokens, args.reps)


def trunk(args) -> None:
    """The embedded SmolLM2 as the target; its experts as two full copies (today's bundle, top K layers
    changed as training changes them) and as those K layers alone over the target's trunk
    (`--expert-layers K`), for K = 2, 4, 6, 8: generation slowdown, extra parameters, and the largest
    logit difference between the two paths (they compute the same numbers)."""
    import copy

    from repair.methods.experts.top import ExpertTop
    from repair.methods.experts.transform import ExpertSetting, ExpertsTransform
    from repair.models import load_model, ModelSpec

    loaded = load_model(ModelSpec())
    target, tokenizer = loaded.model, loaded.tokenizer
    size = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    ids = torch.tensor([tokenizer("The nurse said that the engineer was late because").input_ids])

    def experts(k):
        out = []
        for seed in (1, 2):
            model = copy.deepcopy(target)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for layer in model.model.layers[-k:]:
                    for p in layer.parameters():
                        p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=gen))
            out.append(model)
        return out

    full_params = None
    for k in args.layers:
        full = experts(k)
        tops = [ExpertTop.from_model(target, m, k) for m in full]
        with torch.inference_mode():
            a = ExpertsTransform(target, *full, [ExpertSetting(1.0)]).logits(ids)
            b = ExpertsTransform(target, *tops, [ExpertSetting(1.0)]).logits(ids)
        full_params = size(full)
        print(f"\nK = {k}: tops {size(tops) / 1e6:.1f}M extra parameters, full copies {full_params / 1e6:.1f}M "
              f"({size(tops) / full_params:.1%}); max |logit difference| {float((a - b).abs().max()):.2g}")
        if k == args.layers[0] or args.every_full:
            print("full copies:")
            transform = ExpertsTransform(target, *full, [ExpertSetting(1.0)])
            compare(target, tokenizer, lambda m: transform.attach(), "experts", args.tokens, args.reps)
        print(f"tops over the shared trunk (K = {k}):")
        transform = ExpertsTransform(target, *tops, [ExpertSetting(1.0)])
        compare(target, tokenizer, lambda m: transform.attach(), "experts", args.tokens, args.reps)
        del full, tops


def training(args) -> None:
    """Seconds per step (32 sentences of 16 tokens) of full fine-tuning and of the top layers only."""
    from repair.methods.experts.training import TrainConfig
    from repair.models import load_model, ModelSpec

    model = load_model(ModelSpec()).model
    ids = torch.randint(0, model.config.vocab_size, (32, 16), generator=torch.Generator().manual_seed(0))
    layers = model.model.layers
    for name, trained in {"full fine-tuning": list(model.parameters()),
                          f"top {TrainConfig.layers} layers": [p for l in layers[-TrainConfig.layers:] for p in l.parameters()]}.items():
        model.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained, lr=1e-5)
        times = []
        for _ in range(args.reps + 1):
            began = time.perf_counter()
            with torch.enable_grad():
                model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)
        times = sorted(times[1:])  # the first step allocates the optimizer's state
        print(f"{name:18s} {times[len(times) // 2]:.2f} s/step (median of {args.reps}; {torch.get_num_threads()} threads)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="an experts bundle exported by repair run --method experts")
    p.add_argument("--tiny", action="store_true", help="random target and experts a tenth of its size")
    p.add_argument("--training", action="store_true", help="time a training step: full fine-tuning vs the top layers")
    p.add_argument("--trunk", action="store_true", help="full-copy experts vs tops over the shared trunk, K = --layers")
    p.add_argument("--layers", type=lambda t: [int(x) for x in t.split(",")], default=[6, 2, 4, 8],
                   help="the K of --trunk, comma-separated (default 6,2,4,8; full copies are timed at the first)")
    p.add_argument("--every-full", action="store_true", help="time the full copies at every K of --trunk")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if not (args.checkpoint or args.tiny or args.training or args.trunk):
        p.error("give --checkpoint, --tiny, --training or --trunk")
    if args.checkpoint:
        bundle(args)
    if args.tiny:
        tiny(args)
    if args.training:
        training(args)
    if args.trunk:
        trunk(args)


if __name__ == "__main__":
    main()
