"""Fast evaluator against the reference scorer and a batched plain transformers scorer, side by side
on the same BBQ items in one process.

    python benchmarks/evaluator.py --model smollm2-135m --data-dir ../shared/data --items 200

The batched scorer is what users have (lm-evaluation-harness scores log-likelihoods this way): every
prompt + option its own sequence, sorted by length, 24 sequences a batch, right-padded, the model's
full logits. Checks that all three choose the same answers (scores within 1e-4), then prints items/s
for each, the fast evaluator's tokens/s, this machine's float matrix-multiply peak measured in the
same run (around each fast run), the fraction of it achieved, and as its last lines `speedup: X.XX`
(against the reference) and `speedup over batched: X.XX`. The fast evaluator is timed before and
after the others and averaged, so a drifting machine speed hits both sides alike. With --profile,
it prints instead where one fast pass spends its time, operator by operator.
FLOPs counted: 2 x (block weights) per real token through the blocks + 2 x hidden x vocab per
output-layer position; attention-score FLOPs and padding are not counted, so the fraction is a floor.
"""
from __future__ import annotations

import os
import sys

# benchmarks/search.py would shadow the `search` package: drop this folder from the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from repair.evaluator import Evaluator, ReferenceScorer, WorkCounter, _right_pad, _Tokens, word_start_mask
from repair.models import ModelSpec, load_model
from repair.suites.base import EvalConfig
from repair.suites.bbq import CATEGORIES, BBQSuite


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matrix multiply."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def weight_flops_per_token(model) -> tuple[float, float]:
    """(2 x parameters in the blocks, 2 x hidden x vocab for one output-layer position)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    skip = {id(embed), id(head)}
    pos = getattr(model.base_model, "wpe", None)
    if pos is not None:
        skip.add(id(pos.weight))
    blocks = sum(p.numel() for p in model.parameters() if id(p) not in skip and p.dim() > 1)
    return 2.0 * blocks, 2.0 * head.numel()


class BatchedScorer:
    """lm-eval's way to score choices with plain transformers (see the module docstring); it scores
    the same tokens as the evaluator (prompt + option tokenised jointly, the word-end term)."""

    def __init__(self, model, tokenizer, batch: int = 24):
        self.model, self.tokenizer, self.batch = model, tokenizer, batch
        self.device = next(model.parameters()).device
        self.tokens = _Tokens(tokenizer)
        self.work = WorkCounter()

    @torch.inference_mode()
    def score_choices(self, requests, desc: str = ""):
        from repair.suites.base import OptionScores

        seqs = [(i, self.tokens.request(r)) for i, r in enumerate(requests)]
        rows = [(i, j, prompt, opt, word_end) for i, (prompt, opts, word_end) in seqs for j, opt in enumerate(opts)]
        order = sorted(range(len(rows)), key=lambda k: -(len(rows[k][2]) + len(rows[k][3])))
        totals: dict = {}
        starts = None
        for b in range(0, len(order), self.batch):
            batch = [rows[k] for k in order[b:b + self.batch]]
            ids, mask = _right_pad([p + o for _, _, p, o, _ in batch], self.device)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            self.work.tokens += int(mask.sum())
            self.work.padded_tokens += mask.numel()
            self.work.head_positions += mask.numel()
            for row, (i, j, p, o, word_end) in enumerate(batch):
                at = torch.arange(len(p) - 1, len(p) + len(o) - 1, device=self.device)
                total = float(logp[row, at, torch.tensor(o, device=self.device)].double().sum())
                if word_end:
                    if starts is None:
                        starts = word_start_mask(self.tokenizer, logp.shape[-1]).to(self.device)
                    total += float(torch.logsumexp(logp[row, len(p) + len(o) - 1][starts], dim=0).double())
                totals[i, j] = total
        return [OptionScores(np.array([totals[i, j] for j in range(len(opts))]), np.array([len(o) for o in opts]))
                for i, (_, opts, _) in seqs]


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def profile(fast: Evaluator, requests) -> int:
    """One fast pass under torch.profiler: each operator's share of the operators' own time, largest
    first, with the matrix multiplies' share summed (what the matmul peak bounds) and the rest."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fast.score_choices(requests[:8])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fast.score_choices(requests)
    ops = sorted(((e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(t for _, t, _ in ops)
    matmul = sum(t for k, t, _ in ops if k in MATMUL_OPS)
    print(f"{len(requests)} items; operators' own time {total / 1e6:.1f} s; matrix multiplies {matmul / total:.1%}, "
          f"everything else {1 - matmul / total:.1%}")
    for key, t, n in ops[:16]:
        print(f"  {key:48s} {t / total:6.1%}  {n:7d} calls")
    return 0


def timed(scorer, requests):
    start = time.perf_counter()
    out = scorer.score_choices(requests, desc=type(scorer).__name__)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--mode", choices=["cloze", "choice"], default="cloze")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true",
                    help="instead: where one fast pass spends its time, by operator (torch.profiler)")
    args = ap.parse_args()

    loaded = load_model(ModelSpec(args.model, device=args.device))
    model, tok = loaded.model, loaded.tokenizer
    per_category = math.ceil(args.items / len(CATEGORIES))
    suite = BBQSuite(EvalConfig(data_dir=args.data_dir, limit=per_category, bbq_mode=args.mode), tok)
    requests = suite.requests()
    step = max(1, len(requests) // args.items)
    requests = requests[::step][: args.items]  # spread over categories

    param = next(model.parameters())
    fast = Evaluator(model, tok, batch_tokens=args.batch_tokens, progress=False)
    if args.profile:
        return profile(fast, requests)
    ref = ReferenceScorer(model, tok, progress=False)
    batched = BatchedScorer(model, tok)
    fast.score_choices(requests[:8])  # warm-up (allocator, kernels)
    ref.score_choices(requests[:2])
    batched.score_choices(requests[:8])

    # This machine's speed drifts (a shared VM): time the fast evaluator before and after the
    # reference and measure the matmul peak around every fast run, so drift hits both sides alike.
    peaks, fast_times = [matmul_peak(param.dtype, param.device)], []
    fast_out, seconds = timed(fast, requests)
    fast_times.append(seconds)
    peaks.append(matmul_peak(param.dtype, param.device))
    ref.work.__init__()
    ref_out, ref_s = timed(ref, requests)
    batched.work.__init__()
    batched_out, batched_s = timed(batched, requests)
    peaks.append(matmul_peak(param.dtype, param.device))
    fast.work.__init__()
    fast_out, seconds = timed(fast, requests)
    fast_times.append(seconds)
    peaks.append(matmul_peak(param.dtype, param.device))
    fast_s, peak = float(np.mean(fast_times)), float(np.mean(peaks))

    pick = (lambda s: s.mean_logprob) if args.mode == "cloze" else (lambda s: s.logprob)
    same = sum(int(np.argmax(pick(a)) == np.argmax(pick(b)) == np.argmax(pick(c)))
               for a, b, c in zip(fast_out, ref_out, batched_out))
    max_diff = max(float(max(np.abs(a.logprob - b.logprob).max(), np.abs(a.logprob - c.logprob).max()))
                   for a, b, c in zip(fast_out, ref_out, batched_out))
    per_token, per_head = weight_flops_per_token(model)
    flops = fast.work.tokens * per_token + fast.work.head_positions * per_head

    print(f"model {loaded.source} on {param.device} ({str(param.dtype).replace('torch.', '')}), "
          f"{torch.get_num_threads()} threads; {len(requests)} BBQ {args.mode} items, "
          f"{sum(len(r.options) for r in requests)} options")
    print(f"identical predictions: {same}/{len(requests)}; max |score difference|: {max_diff:.2e}")
    print(f"reference: {len(requests) / ref_s:8.2f} items/s  {ref.work.tokens / ref_s:8.1f} tokens/s  ({ref_s:.1f} s)")
    print(f"batched:   {len(requests) / batched_s:8.2f} items/s  {batched.work.tokens / batched_s:8.1f} tokens/s  "
          f"({batched_s:.1f} s; {batched.work.padded_tokens / max(batched.work.tokens, 1) - 1:.1%} padding)")
    print(f"fast:      {len(requests) / fast_s:8.2f} items/s  {fast.work.tokens / fast_s:8.1f} tokens/s  ({fast_s:.1f} s; "
          f"{fast.work.padded_tokens / max(fast.work.tokens, 1) - 1:.1%} padding)")
    print(f"fast evaluator runs: {', '.join(f'{t:.1f} s' for t in fast_times)}; matmul peaks: "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s")
    print(f"matmul peak (mean): {peak / 1e9:.1f} GFLOP/s; fast evaluator achieved {flops / fast_s / 1e9:.1f} GFLOP/s "
          f"= {flops / fast_s / peak:.1%} of peak")
    print(f"tokens through blocks: reference {ref.work.tokens}, fast {fast.work.tokens}; "
          f"output-layer positions: reference {ref.work.head_positions}, batched {batched.work.head_positions}, "
          f"fast {fast.work.head_positions}")
    print(f"speedup: {ref_s / fast_s:.2f}")
    print(f"speedup over batched: {batched_s / fast_s:.2f}")
    ok = same == len(requests) and max_diff <= 1e-4
    if not ok:
        print("MISMATCH between fast and reference scorer", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
