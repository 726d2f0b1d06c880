"""Scoring a model on the suites: the fast evaluator, and the plain reference it is checked against.

Evaluating a configuration on the LLM is the expensive step of every search, so the fast evaluator
does the least work the answers need:
- each multiple-choice prompt is encoded once and its keys/values serve every option: the options'
  tokens sit side by side after the prompt in the same row, a 4D attention mask keeping each option
  to the prompt and itself (see `_score_batch`), so nothing is recomputed or copied per option;
- the output layer runs only at the positions whose next token is scored (the last prompt token and
  the option tokens), never over the whole sequence;
- prompts are sorted by length and packed into batches of at most `batch_tokens` tokens, padded on
  the right (so no query row is fully masked), with explicit position ids.
The reference scores each prompt+option alone through the plain model with full logits.

Variants: a search scores many configurations (head masks, say) of one model. `score_choices_variants`
and `token_nll_variants` run every item once per variant in the same batches and, before every
forward, tell `on_rows` which variant each batch row belongs to, so an intervention (a `HeadMasker`)
applies a different configuration to each row of one batched forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from repair.errors import UserError
from repair.suites.base import ChoiceRequest, OptionScores


PAD_WASTE = 0.05


@dataclass
class WorkCounter:
    """What the model was asked to compute, for throughput and FLOP accounting."""

    tokens: int = 0  # real (non-padding) tokens through the blocks
    padded_tokens: int = 0  # tokens through the blocks including padding
    head_positions: int = 0  # positions through the output layer


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) for each window: tokens first_target..end-1 are scored in it.

    Every token after the first is scored exactly once, with up to `window - stride` tokens of
    context carried over from the previous window (the usual strided perplexity).
    """
    if window < 2 or stride < 1 or stride > window:
        raise UserError(f"need 2 <= window and 1 <= stride <= window, got window={window} stride={stride}")
    out, prev_end = [], 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        if end > prev_end:
            out.append((begin, end, prev_end))
            prev_end = end
        if end == n_tokens:
            break
    return out


class _Tokens:
    """Tokenisation with a cache: suites repeat prompts and options a lot."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def __call__(self, text: str, special: bool) -> list[int]:
        key = (text, special)
        if key not in self._cache:
            self._cache[key] = list(self.tokenizer(text, add_special_tokens=special).input_ids)
        return self._cache[key]

    def request(self, r: ChoiceRequest) -> tuple[list[int], list[list[int]]]:
        prompt = self(r.prompt, True)
        options = [self(o, False) for o in r.options]
        if not prompt or any(not o for o in options):
            raise UserError(f"a prompt or option tokenises to nothing: {r.prompt[-40:]!r} / {r.options!r}")
        return prompt, options


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


class Evaluator:
    """The fast scorer (see the module docstring). Works on CPU and CUDA alike: the device and dtype
    are the model's."""

    def __init__(self, model, tokenizer, *, batch_tokens: int = 4096, max_rows: int = 128, progress: bool = True,
                 on_rows=None):
        self.model, self.tokenizer = model, tokenizer
        self.on_rows = on_rows  # called with the variant id of every batch row before each forward
        self.backbone = model.base_model  # the decoder stack, ending in the final norm
        self.head = model.get_output_embeddings()
        self.device = _input_device(model)
        self.batch_tokens, self.max_rows, self.progress = batch_tokens, max_rows, progress
        self.tokens = _Tokens(tokenizer)
        self.work = WorkCounter()

    # ---- multiple choice -------------------------------------------------------------------
    def score_choices(self, requests: Sequence[ChoiceRequest], desc: str = "") -> list[OptionScores]:
        return self.score_choices_variants(requests, 1, desc)[0]

    @torch.inference_mode()
    def score_choices_variants(self, requests: Sequence[ChoiceRequest], n_variants: int, desc: str = "") -> list[list[OptionScores]]:
        """Scores of every request under each of `n_variants` variants: result[variant][request]."""
        encoded = [self.tokens.request(r) for r in requests]
        jobs = [(v, i) for i in range(len(encoded)) for v in range(n_variants)]
        width = _row_widths(encoded)
        order = sorted(range(len(jobs)), key=lambda j: width[jobs[j][1]])
        results: list[list] = [[None] * len(encoded) for _ in range(n_variants)]
        with tqdm(total=len(jobs), desc=desc or "scoring", unit="item", disable=not self.progress, leave=False) as bar:
            for batch in self._batches(order, [width[i] for _, i in jobs]):
                variants = torch.tensor([jobs[j][0] for j in batch], device=self.device)
                for j, scores in zip(batch, self._score_batch([encoded[jobs[j][1]] for j in batch], variants)):
                    results[jobs[j][0]][jobs[j][1]] = scores
                bar.update(len(batch))
        return results

    def option_logprobs(self, requests: Sequence[ChoiceRequest]) -> list[torch.Tensor]:
        """Every option's total log-probability, one differentiable tensor per request, under the
        intervention the caller installed (one variant): for gradients of a suite's metric with
        respect to that intervention, e.g. a head mask that requires grad."""
        encoded = [self.tokens.request(r) for r in requests]
        width = _row_widths(encoded)
        out: list = [None] * len(encoded)
        with torch.enable_grad():
            for batch in self._batches(sorted(range(len(encoded)), key=width.__getitem__), width):
                totals = self._option_totals([encoded[i] for i in batch], torch.zeros(len(batch), dtype=torch.long))
                k = 0
                for i in batch:
                    out[i] = totals[k:k + len(encoded[i][1])]
                    k += len(encoded[i][1])
        return out

    def _batches(self, order: list[int], lengths: list[int]):
        """Length buckets: a batch closes when it would exceed `batch_tokens` padded tokens or
        `max_rows` rows, or when padding it to the newest length would waste more than
        `PAD_WASTE` of it (batches of very different lengths cost more than they save)."""
        batch: list[int] = []
        real = 0
        for i in order:  # ascending length, so the newest item is the longest
            padded = (len(batch) + 1) * lengths[i]
            if batch and (padded > self.batch_tokens or len(batch) == self.max_rows
                          or (len(batch) >= 8 and real + lengths[i] < (1 - PAD_WASTE) * padded)):
                yield batch
                batch, real = [], 0
            batch.append(i)
            real += lengths[i]
        if batch:
            yield batch

    def _set_rows(self, variants: torch.Tensor) -> None:
        if self.on_rows is not None:
            self.on_rows(variants)

    def _option_totals(self, items: list[tuple[list[int], list[list[int]]]], variants: torch.Tensor) -> torch.Tensor:
        """One forward per batch: each row is an item's prompt followed by all its options' tokens
        (but the last) side by side. A 4D attention mask lets the prompt attend causally to itself
        and each option to the prompt's keys/values and its own earlier tokens only, with position
        ids restarting after the prompt: the prompt is encoded once and shared by every option,
        exactly as if each option continued the prompt's key/value cache, without copying it."""
        dev = self.device
        rows_opts = [(b, o) for b, (_, opts) in enumerate(items) for o in opts]
        seqs, segs, poss, tgts = [], [], [], []
        j = 0
        for prompt, opts in items:
            seq, seg, pos, tgt = list(prompt), [1] * len(prompt), list(range(len(prompt))), [0] * len(prompt)
            for opt in opts:  # option j's tokens 1.. are predicted from its tokens ..-1
                seq += opt[:-1]
                seg += [j + 2] * (len(opt) - 1)
                pos += range(len(prompt), len(prompt) + len(opt) - 1)
                tgt += opt[1:]
                j += 1
            seqs.append(seq), segs.append(seg), poss.append(pos), tgts.append(tgt)
        ids, valid = _right_pad(seqs, dev)
        seg, _ = _right_pad(segs, dev)  # 0: padding, 1: prompt, j + 2: option j
        pos, _ = _right_pad(poss, dev)
        tgt, _ = _right_pad(tgts, dev)
        width = ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        sees = (seg[:, None, :] == 1) | ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 1))
        self._set_rows(variants)
        out = self.backbone(input_ids=ids, attention_mask=(causal & sees)[:, None], position_ids=pos, use_cache=False)
        self.work.tokens += int(valid.sum())
        self.work.padded_tokens += valid.numel()
        hidden = out.last_hidden_state

        prompt_len = torch.tensor([len(p) for p, _ in items], device=dev)
        first_logp = self._log_softmax(hidden[torch.arange(len(items), device=dev), prompt_len - 1])
        row_of = torch.tensor([b for b, _ in rows_opts], device=dev)
        first_tok = torch.tensor([o[0] for _, o in rows_opts], device=dev)
        totals = first_logp[row_of, first_tok].double()
        rest = seg > 1
        if rest.any():
            logp = self._log_softmax(hidden[rest])
            token_logp = logp.gather(1, tgt[rest][:, None])[:, 0].double()
            totals.index_add_(0, seg[rest] - 2, token_logp)
        return totals

    def _score_batch(self, items: list[tuple[list[int], list[list[int]]]], variants: torch.Tensor) -> list[OptionScores]:
        totals = self._option_totals(items, variants).cpu().numpy()
        n_tok = np.array([len(o) for _, opts in items for o in opts], dtype=np.int64)
        result, k = [], 0
        for _, opts in items:
            result.append(OptionScores(totals[k:k + len(opts)].copy(), n_tok[k:k + len(opts)].copy()))
            k += len(opts)
        return result

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        self.work.head_positions += hidden.shape[0]
        return torch.log_softmax(self.head(hidden).float(), dim=-1)

    # ---- perplexity ------------------------------------------------------------------------
    def token_nll(self, token_ids, window: int, stride: int, desc: str = "") -> np.ndarray:
        return self.token_nll_variants(token_ids, window, stride, 1, desc)[0]

    @torch.inference_mode()
    def token_nll_variants(self, token_ids, window: int, stride: int, n_variants: int, desc: str = "") -> np.ndarray:
        """Per-token NLL (see `Scorer.token_nll`) under each variant: shape (n_variants, n_tokens - 1)."""
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=self.device)
        jobs = [(v, span) for span in sliding_windows(len(ids), window, stride) for v in range(n_variants)]
        nll = torch.zeros((n_variants, max(len(ids) - 1, 0)), dtype=torch.float64, device=self.device)
        per_batch = max(1, min(self.max_rows, self.batch_tokens // window))
        with tqdm(total=len(jobs), desc=desc or "perplexity", unit="window", disable=not self.progress, leave=False) as bar:
            for k in range(0, len(jobs), per_batch):
                group = jobs[k:k + per_batch]
                inputs, mask = _right_pad([ids[b:e].tolist() for _, (b, e, _) in group], self.device)
                self._set_rows(torch.tensor([v for v, _ in group], device=self.device))
                out = self.backbone(input_ids=inputs, attention_mask=mask, use_cache=False)
                self.work.tokens += int(mask.sum())
                self.work.padded_tokens += mask.numel()
                for row, (v, (b, e, t0)) in enumerate(group):
                    # the hidden state at position t-1 predicts token t
                    logp = self._log_softmax(out.last_hidden_state[row, t0 - 1 - b:e - 1 - b])
                    nll[v, t0 - 1:e - 1] = -logp.gather(1, ids[t0:e, None])[:, 0].double()
                bar.update(len(group))
        return nll.cpu().numpy()


def _row_widths(encoded) -> list[int]:
    """Tokens in each request's row: the prompt and every option's tokens but the last."""
    return [len(p) + sum(len(o) - 1 for o in opts) for p, opts in encoded]


def _right_pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


class ReferenceScorer:
    """The straightforward scorer: every prompt+option alone through the plain model, full logits.

    It exists to check the fast evaluator (same answers, scores within 1e-4) and to time it against.
    """

    def __init__(self, model, tokenizer, *, progress: bool = True):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.device = _input_device(model)
        self.tokens = _Tokens(tokenizer)
        self.work = WorkCounter()

    @torch.inference_mode()
    def score_choices(self, requests: Sequence[ChoiceRequest], desc: str = "") -> list[OptionScores]:
        out = []
        for r in tqdm(requests, desc=desc or "reference", unit="item", disable=not self.progress, leave=False):
            prompt, options = self.tokens.request(r)
            totals = []
            for opt in options:
                ids = torch.tensor([prompt + opt], device=self.device)
                logp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
                self.work.tokens += ids.shape[1]
                self.work.padded_tokens += ids.shape[1]
                self.work.head_positions += ids.shape[1]
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(opt) - 1, device=self.device)
                totals.append(float(logp[positions, torch.tensor(opt, device=self.device)].double().sum()))
            out.append(OptionScores(np.array(totals), np.array([len(o) for o in options], dtype=np.int64)))
        return out

    @torch.inference_mode()
    def token_nll(self, token_ids, window: int, stride: int, desc: str = "") -> np.ndarray:
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=self.device)
        nll = np.zeros(max(len(ids) - 1, 0))
        for b, e, t0 in sliding_windows(len(ids), window, stride):
            logp = torch.log_softmax(self.model(input_ids=ids[None, b:e]).logits[0].float(), dim=-1)
            nll[t0 - 1:e - 1] = (-logp[t0 - 1 - b:e - 1 - b].gather(1, ids[t0:e, None])[:, 0]).double().cpu().numpy()
        return nll
