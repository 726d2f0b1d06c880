"""Scoring a model on the suites: the fast evaluator, and the plain reference it is checked against.

Evaluating a configuration on the LLM is the expensive step of every search, so the fast evaluator
does the least work the answers need:
- each multiple-choice prompt is encoded once and its keys/values serve every option: the options'
  tokens sit side by side after the prompt in the same row, a 4D attention mask keeping each option
  to the prompt and itself (see `_option_totals`), so nothing is recomputed or copied per option;
  items that share tokens (a sentence frame, a BBQ context, a pair's prefix) share them the same way,
  one prefix tree per row (repair.packing);
- the output layer runs only at the positions whose next token is scored (the last prompt token and
  the option tokens), never over the whole sequence, and it is the model's own (see `Evaluator`);
- prompts are sorted by length and packed into batches of at most `batch_tokens` tokens, padded on
  the right (so no query row is fully masked), with explicit position ids.
The reference scores each prompt+option alone through the plain model with full logits. Both score
an option on the tokens it gets inside the joint string prompt + option (see `_Tokens`).

Variants: a search scores many configurations (head masks, say) of one model. `score_choices_variants`
and `token_nll_variants` run every item once per variant in the same batches and, before every
forward, tell `on_rows` which variant each batch row belongs to, so an intervention (a `HeadMasker`)
applies a different configuration to each row of one batched forward. An output `transform` (the
decoding-time experts) changes the logits, not the forward: variants that differ only in its
setting share one forward (and one forward of each of its models), each combined its own way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from repair import arch, packing
from repair.errors import UserError
from repair.fanout import fan_out, plan, row_in_stage
from repair.packing import WORD_END
from repair.suites.base import ChoiceRequest, OptionScores


PAD_WASTE = 0.05
VOCAB_ROWS = 64  # positions whose logits are combined and normalised at a time (64 x 49,152 float32: 12.6 MB)
ROW_TOKENS = 256  # a row's tree of items grows to this many tokens (attention over it grows with its square)


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
    """Token ids as the model sees them, cached (suites repeat prompts and options a lot).

    Options are scored on the tokens they get inside the joint string: a tokenizer splits text into
    words before merging, and SentencePiece-style ones (Llama 2, Gemma, Mistral: metaspace) give a
    separately encoded " a" a word-start marker or a different split than " a" gets after the
    prompt. So an option's tokens are the tokens of prompt + option after the prompt's own tokens.

    Boundary merges: where tokenize(prompt + option) does not start with tokenize(prompt) (a token
    spans the boundary, e.g. a prompt ending in a space and an option without one), the prompt keeps
    its own tokens (every option of a request must be scored after the same context) and the option
    falls back to its own separate tokenization, the behaviour before joint tokenization. Such
    (prompt, option) pairs are collected in `merged`, for the suites to report; none of the shipped
    suites produces them (their prompts end without a space and their options start with one).

    Special tokens: the ones the tokenizer adds in front of a text (a BOS) are put before the prompt,
    unless the prompt text already starts with them (a chat template that writes its BOS), so no
    sequence starts with two BOS tokens. Nothing is added after a text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, bool], list[int]] = {}
        self.merged: set[tuple[str, str]] = set()

    def __call__(self, text: str, special: bool) -> list[int]:
        """`text`'s ids; with `special`, preceded by the special tokens the tokenizer puts first."""
        key = (text, special)
        if key not in self._cache:
            ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
            self._cache[key] = self._prefix(text, ids) + ids if special else ids
        return self._cache[key]

    def _prefix(self, text: str, ids: list[int]) -> list[int]:
        full = list(self.tokenizer(text, add_special_tokens=True).input_ids)
        n = next((k for k in range(len(full) - len(ids), -1, -1) if full[k:k + len(ids)] == ids), 0)
        prefix = full[:n]  # what comes before the text's own ids (all of `full` for an empty text)
        return [] if ids[:n] == prefix else prefix

    def request(self, r: ChoiceRequest) -> tuple[list[int], list[list[int]], bool]:
        """(prompt ids with the leading special tokens, each option's ids, r.word_end)."""
        alone = self(r.prompt, False)
        options = []
        for option in r.options:
            joint = self(r.prompt + option, False)
            if joint[:len(alone)] == alone and len(joint) > len(alone):
                options.append(joint[len(alone):])
            else:
                self.merged.add((r.prompt, option))
                options.append(self(option, False))
        prompt = self(r.prompt, True)
        if not prompt or any(not o for o in options):
            raise UserError(f"a prompt or option tokenises to nothing: {r.prompt[-40:]!r} / {r.options!r}")
        return prompt, options, bool(getattr(r, "word_end", False))


def word_start_mask(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """Bool [vocab]: the tokens that cannot continue the word before them, i.e. that start a new word
    or end the text. A word ends after an option exactly when the next token is one of these, so
    log P(word ends | prompt, option) = logsumexp of the next position's log-probs over this mask.

    A token starts a word when its text begins with whitespace or with anything that is not a
    letter, digit, mark or underscore (punctuation, symbols), read from its raw form where the raw
    form carries the marker (byte-level BPE 'Ġ', metaspace '▁'; the decoders drop a leading '▁'),
    else from its decoded text (byte tokenizers, byte-fallback '<0x20>'). WordPiece tokens start a
    word unless they begin with '##'. Special tokens (EOS, BOS, padding, chat markers) end the text,
    so they count. Incomplete UTF-8 characters (decoded as U+FFFD) continue a word. Ids beyond
    the tokenizer (padding rows of a larger embedding) are False.
    """
    import unicodedata

    n = len(tokenizer) if hasattr(tokenizer, "__len__") else vocab_size
    size = vocab_size if vocab_size is not None else n
    n = min(n, size)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    special |= {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    wordpiece = type(getattr(backend, "model", None)).__name__ == "WordPiece"
    to_raw = getattr(tokenizer, "convert_ids_to_tokens", None)
    raw = to_raw(list(range(n))) if to_raw is not None else [None] * n

    def starts(i: int) -> bool:
        r = raw[i]
        if i in special:
            return True
        if wordpiece:
            return bool(r) and not r.startswith("##")
        if r is not None and r.startswith(("\u2581", "\u0120")):  # '▁' metaspace, 'Ġ' byte-level space
            return True
        text = tokenizer.decode([i])
        if not text or text[0] == "\ufffd":
            return False
        c = text[0]
        return c.isspace() or not (c.isalnum() or c == "_" or unicodedata.category(c).startswith("M"))

    mask = torch.zeros(size, dtype=torch.bool)
    mask[:n] = torch.tensor([starts(i) for i in range(n)], dtype=torch.bool)
    return mask


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


class Evaluator:
    """The fast scorer (see the module docstring). Works on CPU and CUDA alike: the device and dtype
    are the model's.

    Logits come from the model's own output layer: the CausalLM's forward gets `logits_to_keep` as a
    boolean mask of the scored positions (transformers 5 then runs its head there only, flattened
    row-major), so whatever a model does after its projection (Gemma 2/3 soft-cap the logits, Cohere
    scales them, Granite divides them, and so do dozens of others) is applied exactly, with no table
    of transforms to keep up to date. Where the forward takes no such mask (older transformers,
    remote code), the backbone and the output embeddings are run separately, as this evaluator did
    before. When the evaluator is built, a few tokens go through the plain `model(...)` and through
    the batched path; the first of the two ways that reproduces the plain forward is used, and a
    model that neither reproduces is refused with one line naming its class instead of mis-scored.
    """

    def __init__(self, model, tokenizer, *, batch_tokens: int = 4096, max_rows: int = 128, row_tokens: int = ROW_TOKENS,
                 progress: bool = True, on_rows=None, transform=None, first_layer=None):
        self.model, self.tokenizer = model, tokenizer
        # called with the variant id of every batch row before each forward (and, when rows share the layers below
        # the first one their variants change, with those of each lower stage's rows: see `_sharing`)
        self.on_rows = on_rows
        self.first_layer = first_layer  # variant ids -> the first decoder layer any of them changes, None if none (see `_sharing`)
        self.transform = transform  # shifts the logits per variant (decoding-time experts), see `_groups`
        self.backbone = model.base_model  # the decoder stack, ending in the final norm
        self.head = model.get_output_embeddings()
        self.device = _input_device(model)
        embed = model.get_input_embeddings().weight.dtype
        self._mask_dtype = embed if embed.is_floating_point else torch.float32
        self.batch_tokens, self.max_rows, self.progress = batch_tokens, max_rows, progress
        self.row_tokens = row_tokens  # the widest prefix tree items are packed into (repair.packing)
        self.tokens = _Tokens(tokenizer)
        config = arch.text_config(model)
        self._layer_types = sorted(set(getattr(config, "layer_types", None) or ()))
        self._window = getattr(config, "sliding_window", None) if not self._layer_types or \
            "sliding_attention" in self._layer_types else None
        self._word_start: torch.Tensor | None = None
        self._own_head = True
        self.work = WorkCounter()
        self._fanned = None  # the stages of the batch being scored (`_sharing`)
        self.shares_trunk = False
        self._check_against_plain_forward()
        self.shares_trunk = first_layer is not None and self._check_fan_out()
        # the transform's own models, each scored the way this evaluator scores the target (checked likewise);
        # tops over the target's trunk read the target's forward instead (repair.methods.experts.top)
        self._trunk = transform.trunk_reader() if getattr(transform, "tops", False) else None
        self._experts = [] if self._trunk is not None else [
            Evaluator(m, tokenizer, batch_tokens=batch_tokens, max_rows=max_rows, progress=False)
            for m in getattr(transform, "models", ())]
        self.work = WorkCounter()

    @property
    def boundary_merges(self) -> int:
        """Distinct (prompt, option) pairs tokenised with the boundary-merge rule (see `_Tokens`)."""
        return len(self.tokens.merged)

    # ---- the model ------------------------------------------------------------------------
    def _log_probs(self, ids, attention_mask, position_ids, keep: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the model's logits at the `keep` positions (bool [B, T]), flattened row-major."""
        return torch.log_softmax(self._logits(ids, attention_mask, position_ids, keep), dim=-1)

    def _logits(self, ids, attention_mask, position_ids, keep: torch.Tensor) -> torch.Tensor:
        """The model's logits (float32) at the `keep` positions (bool [B, T]), flattened row-major."""
        inputs = dict(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self._own_head:
            logits = self.model(**inputs, logits_to_keep=keep).logits
        else:
            logits = self.head(self.backbone(**inputs).last_hidden_state[keep])
        if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
            raise RuntimeError(f"logits of shape {tuple(logits.shape)} for {int(keep.sum())} kept positions")
        self.work.head_positions += logits.shape[0]
        return logits.float()

    def _tree_mask(self, sees: torch.Tensor, pos: torch.Tensor):
        """The 4D attention mask(s) for `sees` ([B, T, T] bool, query x key). A 4D mask reaches attention
        as given, so the sliding windows a model adds to its own masks (Gemma 2/3, Mistral, Phi-3,
        Cohere 2) are applied here, on position ids: a query at p sees keys at positions > p - window.
        Models that mix full and sliding layers take one mask per layer type."""
        full = self._additive(sees)
        if not self._window:
            return full
        sliding = self._additive(sees & (pos[:, :, None] - pos[:, None, :] < self._window))
        if not self._layer_types:
            return sliding
        return {kind: sliding if kind == "sliding_attention" else full for kind in self._layer_types}

    def _additive(self, sees: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T] in the model's dtype, 0 where attended and the dtype's minimum elsewhere: eager
        attention (Gemma 2's default) adds the mask to the scores, so a boolean mask would be added as
        0/1; SDPA takes the additive form too."""
        dtype = self._mask_dtype
        return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]

    def _word_start_mask(self, size: int) -> torch.Tensor:
        if self._word_start is None or self._word_start.shape[0] != size:
            with torch.inference_mode(False):  # a plain tensor, usable under autograd too (option_logprobs)
                self._word_start = word_start_mask(self.tokenizer, size).to(self.device)
        return self._word_start

    @torch.inference_mode()
    def _check_against_plain_forward(self) -> None:
        """Refuse a model whose scores this evaluator cannot reproduce (see the class docstring), on
        random token ids, under variant 0 of the caller's intervention (`on_rows`) if any. Two checks:
        the head (log-probs of one plain sequence, within 1e-4 of the logits' scale in float32, 1e-2 in
        16-bit: a missing soft-cap or scale is far larger) and the batched tree of options with its 4D
        mask (option totals, within 1e-3 per token in float32, 0.25 in 16-bit: an attention that ignores
        the mask lets options see each other and moves them by more)."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (11,), generator=torch.Generator().manual_seed(0)).tolist()
        prompt, options = ids[:5], [ids[5:8], ids[8:11], ids[5:6]]
        one_row = torch.zeros(1, dtype=torch.long, device=self.device)
        plain = []
        for o in options:
            self._set_rows(one_row)
            plain.append(torch.log_softmax(self.model(input_ids=torch.tensor([prompt + o], device=self.device)).logits[0].float(), -1))
        want = torch.tensor([float(lp[torch.arange(len(prompt) - 1, len(prompt) + len(o) - 1), o].double().sum())
                             for lp, o in zip(plain, options)], dtype=torch.float64)
        exact = next(self.model.parameters()).dtype == torch.float32
        scale = 1 + float(plain[0].abs().max())
        problem = ""
        for own in (True, False):
            self._own_head = own
            try:
                seq = torch.tensor([prompt + options[0]], device=self.device)
                self._set_rows(one_row)
                head = self._log_probs(seq, None, None, torch.ones_like(seq, dtype=torch.bool))
                got = self._option_totals([[(prompt, options, False)]], one_row).cpu()
            except Exception as e:  # a forward that takes no bool logits_to_keep, or no 4D mask
                problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                continue
            head_err = float((head - plain[0]).abs().max()) / scale
            tree_err = float(((got - want).abs() / 3).max())
            if head_err <= (1e-4 if exact else 1e-2) and tree_err <= (1e-3 if exact else 0.25):
                return
            problem = f"log-probs differ from its own forward by {head_err:.2g} of the logits' scale (head), " \
                      f"{tree_err:.2g} per token (batched options)"
        raise UserError(f"{type(self.model).__name__}: the fast evaluator cannot reproduce this model's own forward "
                        f"({problem}); this architecture is not supported (use {arch.SUPPORTED})")

    @torch.inference_mode()
    def _check_fan_out(self) -> bool:
        """Whether two rows of one item fanned out at the middle layer (repair.fanout) score what two
        separate rows score, under variant 0 of the caller's intervention; where they do not, every
        row runs its own forward."""
        self._depth = len(arch.decoder_layers(self.model))
        if self._depth < 2:
            return False
        vocab = self.model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(1)).tolist()
        items = [[(ids[:4], [ids[4:7], ids[7:9]], False)]] * 2 + [[(ids[1:6], [ids[6:9]], False)]]
        rows = torch.zeros(3, dtype=torch.long, device=self.device)
        separate = self._option_totals(items, rows)
        shared = self._option_totals(items, rows, share=self._depth // 2)
        exact = next(self.model.parameters()).dtype == torch.float32
        return bool(((shared - separate).abs() <= (1e-4 if exact else 0.25) * (1 + separate.abs())).all())

    def _sharing(self, keys: list, variants: torch.Tensor, layer: int | None = None):
        """How a batch shares its forward (repair.fanout.plan): None (every row its own), or its stages.
        Rows of one item (equal `keys`) compute the same below the first layer their variants change
        (`layer`: that layer for every row, forced)."""
        if layer is None and not self.shares_trunk:
            return None
        ids = variants.tolist()
        firsts = {v: layer if layer is not None else self.first_layer([v]) for v in set(ids)}
        return plan(keys, [firsts[v] for v in ids], self._depth)

    def _forward(self, ids, mask, pos, keep, variants: torch.Tensor, valid: torch.Tensor, stages) -> torch.Tensor:
        """The logits at the kept positions (`_logits`) of a batch whose rows run under `variants`,
        shared below the layers they change where `stages` (`_sharing`) say so."""
        self._fanned = stages
        if stages is None:
            self._set_rows(variants)
            self.work.tokens += int(valid.sum())
            self.work.padded_tokens += valid.numel()
            return self._logits(ids, mask, pos, keep)
        self._set_rows(variants, [variants[s.rows] for s in stages[:-1]])
        ends = [s.layer for s in stages[1:]] + [self._depth]
        for stage, end in zip(stages, ends):  # token counts in units of whole forwards
            share = (end - stage.layer) / self._depth
            self.work.tokens += round(int(valid[stage.rows].sum()) * share)
            self.work.padded_tokens += round(valid[stage.rows].numel() * share)
        reps = torch.tensor(stages[0].rows, device=self.device)

        def pick(value):
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            return None if value is None else value[reps]

        with fan_out(self.model, stages):
            return self._logits(ids[reps], pick(mask), pick(pos), keep)

    # ---- multiple choice -------------------------------------------------------------------
    def score_choices(self, requests: Sequence[ChoiceRequest], desc: str = "") -> list[OptionScores]:
        return self.score_choices_variants(requests, 1, desc)[0]

    @torch.inference_mode()
    def score_choices_variants(self, requests: Sequence[ChoiceRequest], n_variants: int, desc: str = "") -> list[list[OptionScores]]:
        """Scores of every request under each of `n_variants` variants: result[variant][request]."""
        encoded = [self.tokens.request(r) for r in requests]
        trees, width = packing.pack(encoded, self.row_tokens)
        groups = self._groups(n_variants)
        jobs = [(g, t) for t in range(len(trees)) for g in range(len(groups))]
        order = sorted(range(len(jobs)), key=lambda j: width[jobs[j][1]])
        results: list[list] = [[None] * len(encoded) for _ in range(n_variants)]
        with tqdm(total=len(encoded) * n_variants, desc=desc or "scoring", unit="item", disable=not self.progress,
                  leave=False) as bar:
            for batch in self._batches(order, [width[t] for _, t in jobs]):
                members = [groups[jobs[j][0]][1] for j in batch]
                rows = torch.tensor([groups[jobs[j][0]][0] for j in batch], device=self.device)
                batch_trees = [trees[jobs[j][1]] for j in batch]
                for v, row, k, scores in self._score_batch([[encoded[i] for i in t] for t in batch_trees], rows, members):
                    results[v][batch_trees[row][k]] = scores
                bar.update(sum(len(m) * len(t) for m, t in zip(members, batch_trees)))
        return results

    def _groups(self, n_variants: int) -> list[tuple[int, list[int]]]:
        """(the variant a row's forward runs under, the variants read off that forward), covering every
        variant once. Without a transform each variant needs its own forward; with one, variants that
        differ only in the transform's settings (`transform.forward_of`) share the forward, and each is
        the shared logits combined its own way."""
        if self.transform is None:
            return [(v, [v]) for v in range(n_variants)]
        shared: dict[int, list[int]] = {}
        for v in range(n_variants):
            shared.setdefault(self.transform.forward_of[v], []).append(v)
        return list(shared.items())

    def _trunk_tops(self, rows: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """The tops' logits (float32) at the kept positions of `rows`, from the trunk this batch's forward
        passed; [] for full expert models."""
        if self._trunk is None:
            return []
        read = rows
        if self._fanned is not None and self._trunk.hidden.shape[0] != keep.shape[0]:  # read before the rows fanned out
            k = next(k for k, s in enumerate(self._fanned) if len(s.rows) == self._trunk.hidden.shape[0])
            read = torch.tensor(row_in_stage(self._fanned, k), device=rows.device)[rows]
        out = [z.float() for z in self.transform.top_logits(self._trunk, read, keep[rows])]
        self.work.head_positions += sum(z.shape[0] for z in out)
        return out

    def _variant_logits(self, logits: torch.Tensor, members: list[list[int]], keep: torch.Tensor, text: torch.Tensor,
                        experts):
        """(variant, where, z_of) for each variant of `members`: `z_of(a, b)` gives the variant's logits
        at its positions a..b-1, and `where` numbers the kept positions that way (-1 at rows that do not
        stand for the variant; None: every kept position, in order). `experts(rows)` gives the
        transform's models' logits at the kept positions of `rows`. Without a transform each row has
        one variant and the plain logits serve them all (variant None: each row's own).

        A batch may mix rows of many forwards (several methods' configurations): the variants the
        transform leaves alone read the plain logits; the experts run only on rows that stand for a
        variant they change, once per distinct row of `text` (their logits depend on the text alone:
        rows with equal `text` compute the same). A variant's logits are combined a slice at a time as
        they are read (`_term_log_probs`), never for all positions at once."""
        def plain(a, b):
            return logits[a:b]

        if self.transform is None:
            yield None, None, plain
            return
        counts = keep.sum(1).tolist()
        starts = np.cumsum([0, *counts[:-1]]).tolist()
        dev = logits.device

        def positions(rows, start):
            return torch.cat([torch.arange(start[r], start[r] + counts[r], device=dev) for r in rows])

        wanted = sorted({v for m in members for v in m})
        active = {v for v in wanted if self.transform.active([v])}
        need = [r for r, m in enumerate(members) if active & set(m)]
        if need and self._trunk is not None:  # tops read each row's own trunk: nothing to share between rows
            same_as = {r: r for r in need}
        elif need:
            _, inverse = torch.unique(text[need], dim=0, return_inverse=True)
            first: dict[int, int] = {}
            for r, u in zip(need, inverse.tolist()):
                first.setdefault(u, r)
            same_as = {r: first[u] for r, u in zip(need, inverse.tolist())}
        if need:
            reps = sorted(set(same_as.values()))
            shift = experts(torch.tensor(reps, device=text.device))
            rep_start = dict(zip(reps, np.cumsum([0, *[counts[r] for r in reps[:-1]]]).tolist()))
        for v in wanted:
            if v not in active:
                yield v, None, plain
                continue
            rows = [r for r, m in enumerate(members) if v in m]
            at = positions([same_as[r] for r in rows], rep_start)  # each of the variant's positions in `shift`
            if len(rows) == len(members):
                own, where = None, None
            else:
                own = positions(rows, starts)
                where = torch.full((logits.shape[0],), -1, dtype=torch.long, device=dev)
                where[own] = torch.arange(len(own), device=dev)
            in_order = len(at) == shift[0].shape[0] and bool((at == torch.arange(len(at), device=dev)).all())

            def z_of(a, b, v=v, own=own, at=at, in_order=in_order):
                part = logits[a:b] if own is None else logits[own[a:b]]
                return self.transform.apply(part, [s[a:b] if in_order else s[at[a:b]] for s in shift], v)

            yield v, where, z_of

    def option_logprobs(self, requests: Sequence[ChoiceRequest]) -> list[torch.Tensor]:
        """Every option's total log-probability, one differentiable tensor per request, under the
        intervention the caller installed (one variant): for gradients of a suite's metric with
        respect to that intervention, e.g. a head mask that requires grad."""
        encoded = [self.tokens.request(r) for r in requests]
        trees, width = packing.pack(encoded, self.row_tokens)
        out: list = [None] * len(encoded)
        with torch.enable_grad():
            for batch in self._batches(sorted(range(len(trees)), key=width.__getitem__), width):
                rows = [[encoded[i] for i in trees[t]] for t in batch]
                totals = self._option_totals(rows, torch.zeros(len(batch), dtype=torch.long, device=self.device))
                k = 0
                for i in (i for t in batch for i in trees[t]):
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

    def _set_rows(self, variants: torch.Tensor, shared: list[torch.Tensor] | None = None) -> None:
        if self.on_rows is not None:
            self.on_rows(variants) if shared is None else self.on_rows(variants, shared)

    def _option_totals(self, rows: list[list[tuple[list[int], list[list[int]], bool]]], variants: torch.Tensor,
                       members: list[list[int]] | None = None, share: int | None = None):
        """One forward per batch: each row is a prefix tree of its items (repair.packing): every
        distinct token path of their prompts and options (all of an option's tokens but the last,
        unless a word end is scored) once, each token seeing its ancestors through a 4D attention
        mask, at the position of its depth. A prompt is thus encoded once and shared by its options,
        exactly as if each option continued the prompt's key/value cache, without copying it, and so
        are the tokens items share. Logits are computed only at the nodes whose next token is scored.

        Rows of one tree under different variants share the layers below the first one their variants
        change (`_sharing`; `share`: that layer, forced, for `_check_fan_out`).

        Returns every option's total log-probability (a tensor, in row, item, option order); with
        `members` (the variants each row stands for, see `_groups`), (variant, totals) pairs instead."""
        packed = packing.build(rows, self.device)
        ids, pos, sees, keep = packed.ids, packed.position, packed.sees, packed.keep
        keys = [tuple((tuple(p), tuple(map(tuple, o)), w) for p, o, w in row) for row in rows]
        logits = self._forward(ids, self._tree_mask(sees, pos), pos, keep, variants, packed.valid,
                               self._sharing(keys, variants, share))

        at = (keep.flatten().cumsum(0) - 1).view_as(keep)  # each kept node's row in the logits
        read = at[packed.term_row, packed.term_node]  # the kept position each term reads

        def totals(where, z_of):  # an option's total: the sum of its terms' log-probs (packing.build)
            terms = self._term_log_probs(z_of, where, logits.shape[0], read, packed.term_target)
            return torch.zeros(packed.n_options, dtype=torch.float64, device=self.device).index_add(0, packed.term_option, terms)

        if members is None:
            return totals(None, lambda a, b: logits[a:b])
        experts = lambda r: self._trunk_tops(r, keep) or [  # noqa: E731
            e._logits(ids[r], e._tree_mask(sees[r], pos[r]), pos[r], keep[r]) for e in self._experts]
        text = torch.cat([ids, packed.parent], dim=1)  # rows computing the same: equal tokens in the same tree
        return [(v, totals(where, z_of)) for v, where, z_of in self._variant_logits(logits, members, keep, text, experts)]

    def _term_log_probs(self, z_of, where, n_kept: int, reads: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(target) at each term's kept position `reads` (float64; 0 at positions `where` leaves out),
        from a variant's (`_variant_logits`) logits `z_of(a, b)` ([b - a, vocab], its positions as `where`
        numbers them; None: all `n_kept`, in order); `targets` are token ids or WORD_END, whose log-prob is
        that of the tokens that start a new word. Read VOCAB_ROWS positions at a time: a slice's logits
        and softmax stay small and are reused, where log-probs of every position at once (hundreds of MB
        per variant in a batch) would be allocated, faulted in and freed each time."""
        n = n_kept if where is None else int((where >= 0).sum())
        reads = reads if where is None else where[reads]
        out = torch.zeros(reads.shape, dtype=torch.float64, device=reads.device)
        order = torch.argsort(reads)
        bounds = torch.searchsorted(reads[order], torch.arange(0, n + VOCAB_ROWS, VOCAB_ROWS, device=reads.device)).tolist()
        for k, a in enumerate(range(0, n, VOCAB_ROWS)):
            if bounds[k] == bounds[k + 1]:
                continue
            z = z_of(a, min(a + VOCAB_ROWS, n)).float()
            terms = order[bounds[k]:bounds[k + 1]]
            local, target = reads[terms] - a, targets[terms]
            lse = torch.logsumexp(z, dim=-1)
            token = target != WORD_END
            value = torch.zeros(len(terms), dtype=torch.float64, device=reads.device)
            value = value.index_put((token.nonzero()[:, 0],), (z[local[token], target[token]] - lse[local[token]]).double())
            end = ~token
            if end.any():
                mass = torch.logsumexp(z[local[end]][:, self._word_start_mask(z.shape[1])], dim=-1) - lse[local[end]]
                value = value.index_put((end.nonzero()[:, 0],), mass.double())
            out = out.index_put((terms,), value)
        return out

    def _score_batch(self, rows: list[list[tuple[list[int], list[list[int]], bool]]], variants: torch.Tensor,
                     members: list[list[int]]):
        """(variant, row, item within the row, OptionScores) for every item of the batch's rows and every
        variant its row stands for."""
        n_tok = np.array([len(o) for row in rows for _, opts, _ in row for o in opts], dtype=np.int64)
        for v, totals in self._option_totals(rows, variants, members):
            totals = totals.cpu().numpy()
            k = 0
            for r, row in enumerate(rows):
                for i, (_, opts, _) in enumerate(row):
                    if v is None or v in members[r]:
                        yield (members[r][0] if v is None else v), r, i, OptionScores(totals[k:k + len(opts)].copy(),
                                                                                      n_tok[k:k + len(opts)].copy())
                    k += len(opts)

    # ---- perplexity ------------------------------------------------------------------------
    def token_nll(self, token_ids, window: int, stride: int, desc: str = "") -> np.ndarray:
        return self.token_nll_variants(token_ids, window, stride, 1, desc)[0]

    @torch.inference_mode()
    def token_nll_variants(self, token_ids, window: int, stride: int, n_variants: int, desc: str = "") -> np.ndarray:
        """Per-token NLL (see `Scorer.token_nll`) under each variant: shape (n_variants, n_tokens - 1)."""
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=self.device)
        groups = self._groups(n_variants)
        jobs = [(g, span) for span in sliding_windows(len(ids), window, stride) for g in range(len(groups))]
        nll = torch.zeros((n_variants, max(len(ids) - 1, 0)), dtype=torch.float64, device=self.device)
        per_batch = max(1, min(self.max_rows, self.batch_tokens // window))
        with tqdm(total=len(jobs), desc=desc or "perplexity", unit="window", disable=not self.progress, leave=False) as bar:
            for k in range(0, len(jobs), per_batch):
                group = jobs[k:k + per_batch]
                inputs, mask = _right_pad([ids[b:e].tolist() for _, (b, e, _) in group], self.device)
                keep = torch.zeros_like(mask, dtype=torch.bool)
                for row, (_, (b, e, t0)) in enumerate(group):
                    keep[row, t0 - 1 - b:e - 1 - b] = True  # the hidden state at position t-1 predicts token t
                variants = torch.tensor([groups[g][0] for g, _ in group], device=self.device)
                logits = self._forward(inputs, mask, None, keep, variants, mask,
                                       self._sharing([span for _, span in group], variants))
                targets = torch.cat([ids[t0:e] for _, (_, e, t0) in group])
                members = [groups[g][1] for g, _ in group]
                experts = lambda r: self._trunk_tops(r, keep) or [  # noqa: E731
                    e._logits(inputs[r], mask[r], None, keep[r]) for e in self._experts]
                read = torch.arange(len(targets), device=self.device)
                for v, where, z_of in self._variant_logits(logits, members, keep, inputs, experts):
                    scored = -self._term_log_probs(z_of, where, len(targets), read, targets)
                    at = 0
                    for row, (_, (_, e, t0)) in enumerate(group):
                        if v is None or v in members[row]:
                            nll[members[row][0] if v is None else v, t0 - 1:e - 1] = scored[at:at + e - t0]
                        at += e - t0
                bar.update(len(group))
        return nll.cpu().numpy()


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
    It scores the same tokens (prompt + option tokenised jointly, see `_Tokens`) and the same word-end
    term, computed from the plain forward's full logits.
    """

    def __init__(self, model, tokenizer, *, progress: bool = True):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.device = _input_device(model)
        self.tokens = _Tokens(tokenizer)
        self.work = WorkCounter()
        self._starts: torch.Tensor | None = None

    @torch.inference_mode()
    def score_choices(self, requests: Sequence[ChoiceRequest], desc: str = "") -> list[OptionScores]:
        out = []
        for r in tqdm(requests, desc=desc or "reference", unit="item", disable=not self.progress, leave=False):
            prompt, options, word_end = self.tokens.request(r)
            totals = []
            for opt in options:
                ids = torch.tensor([prompt + opt], device=self.device)
                logp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
                self.work.tokens += ids.shape[1]
                self.work.padded_tokens += ids.shape[1]
                self.work.head_positions += ids.shape[1]
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(opt) - 1, device=self.device)
                total = float(logp[positions, torch.tensor(opt, device=self.device)].double().sum())
                if word_end:  # the position after the option's last token: does a new word (or the text's end) follow?
                    if self._starts is None:
                        self._starts = word_start_mask(self.tokenizer, logp.shape[1]).to(self.device)
                    total += float(torch.logsumexp(logp[-1][self._starts], dim=0).double())
                totals.append(total)
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
