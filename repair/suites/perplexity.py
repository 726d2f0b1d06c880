"""Perplexity suites: the language-modelling utility check next to the bias suites.

Split design. The tokenised text is cut into fixed chunks of `ppl_window` tokens; chunk ids are the
"templates" of `assign_splits`, so ~30% of the chunks are held out for `report` and ~20% for `select`. The selected chunks
are taken in text order until `ppl_tokens` tokens are scored. Runs of adjacent selected chunks are
scored together as one sequence with `scorer.token_nll` (sliding window, `ppl_stride`), so context
flows across chunk borders inside a run but never from a chunk of the other split; only the first
token of each run is unscored. With split "all" this is the usual HF sliding-window perplexity over
the first `ppl_tokens + 1` tokens. Each token's NLL is credited to its chunk, and chunks are the units
of the bootstrap interval.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repair.errors import DataError, UserError
from repair.stats import Units, ratio_metric, units_metric
from repair.suites.base import EvalConfig, SuiteResult, assign_splits, sha256_file


BLOCK = 64  # tokens per bootstrap unit of the perplexity interval


@dataclass(frozen=True)
class Chunk:
    id: int
    side: str  # "search", "select" or "report"
    start: int  # token offsets into the whole text
    stop: int


def plan_runs(n_total: int, window: int, max_scored: int, split: str) -> list[list[Chunk]]:
    """Group the selected chunks into runs of adjacent chunks, cut so that `max_scored` tokens are
    scored (each run's first token has no context and is not scored)."""
    n_chunks = -(-n_total // window)
    sides = assign_splits(range(n_chunks))
    runs: list[list[Chunk]] = []
    scored, prev = 0, None
    for c in range(n_chunks):
        if scored >= max_scored:
            break
        side = sides.get(c, "search")  # a lone chunk is never held out
        if split != "all" and side != split:
            continue
        start, stop = c * window, min((c + 1) * window, n_total)
        new_run = prev != c - 1
        stop = min(stop, start + max_scored - scored + int(new_run))
        n_scored = stop - start - int(new_run)
        if n_scored < 1:
            continue
        if new_run:
            runs.append([])
        runs[-1].append(Chunk(c, side, start, stop))
        scored, prev = scored + n_scored, c
    return runs


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids without special tokens (a BOS would be scored as text).

    `verbose=False` silences HF's "sequence longer than the model maximum" warning, which does not apply
    to sliding-window scoring; tokenizers that do not take it are called without it.
    """
    try:
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:
        encoded = tokenizer(text, add_special_tokens=False)
    return np.asarray(encoded.input_ids, dtype=np.int64)


class PerplexitySuite:
    """Shared implementation: subclasses provide `name` and `load_text()`.

    The constructor reads the text and checks the settings, so bad data or flags fail before any model
    work; tokenising waits for `run` when no tokenizer was given (the scorer's is used).
    """

    name = "perplexity"

    def __init__(self, config: EvalConfig, tokenizer=None):
        self.config, self.tokenizer = config, tokenizer
        if config.ppl_tokens < 1:
            raise UserError(f"--ppl-tokens must be at least 1, got {config.ppl_tokens}")
        if config.ppl_window < 2:
            raise UserError(f"--ppl-window must be at least 2, got {config.ppl_window}")
        if not 1 <= config.ppl_stride <= config.ppl_window:
            raise UserError(f"--ppl-stride must be between 1 and --ppl-window ({config.ppl_window}), got {config.ppl_stride}")
        self.files: dict[str, str] = {}
        self.text = self.load_text()

    def load_text(self) -> str:
        raise NotImplementedError

    def runs(self, tokenizer=None) -> tuple[np.ndarray, list[list[Chunk]]]:
        """The token ids of the whole text and the runs of chunks to score."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise ValueError("a tokenizer is needed: pass one to the suite or call run(scorer)")
        ids = encode(tokenizer, self.text)
        cfg = self.config
        runs = plan_runs(len(ids), cfg.ppl_window, cfg.ppl_tokens, cfg.split)
        if not runs:
            raise UserError(f"the {self.name} text has no tokens to score in the {cfg.split!r} split ({len(ids)} tokens in all)")
        return ids, runs

    def run(self, scorer) -> SuiteResult:
        ids, runs = self.runs(scorer.tokenizer if self.tokenizer is None else self.tokenizer)
        cfg = self.config
        nlls = []
        for run in runs:
            tokens = ids[run[0].start : run[-1].stop]
            nll = np.asarray(scorer.token_nll(tokens, window=cfg.ppl_window, stride=cfg.ppl_stride, desc=self.name), dtype=np.float64)
            if nll.shape != (len(tokens) - 1,):
                raise ValueError(f"token_nll returned {nll.shape} values for {len(tokens)} tokens, expected {len(tokens) - 1}")
            nlls.append(nll)
        return self.score(runs, nlls)

    def score(self, runs: list[list[Chunk]], nlls: list[np.ndarray]) -> SuiteResult:
        """Credit each run's NLLs (token 1.. of the run) to their chunks (the records); the interval
        resamples blocks of about BLOCK tokens."""
        records = []
        for run, nll in zip(runs, nlls, strict=True):
            base = run[0].start
            for ch in run:
                lo, hi = max(ch.start - base, 1) - 1, ch.stop - base - 1
                records.append({"chunk": ch.id, "split": ch.side, "start": ch.start, "n_tokens": hi - lo, "nll_sum": float(nll[lo:hi].sum())})
        # Bootstrap units: blocks of BLOCK scored tokens (not whole chunks), so a few thousand tokens
        # still give a usable interval; neighbouring tokens stay together.
        blocks = [b for nll in nlls for b in np.array_split(nll, max(1, int(np.ceil(len(nll) / BLOCK))))]
        nll_sum = np.array([b.sum() for b in blocks])
        n_tok = np.array([len(b) for b in blocks], dtype=np.float64)

        seed = self.config.seed
        metrics = {
            "overall/perplexity": units_metric(Units(((nll_sum, n_tok, 1.0, 0.0),), exp=True), "lower",
                                               n=int(n_tok.sum()), seed=seed),
            "overall/nll": ratio_metric(nll_sum, n_tok, "lower", seed=seed),
        }
        info = {"n_tokens": int(n_tok.sum()), "n_chunks": len(records), "n_runs": len(runs),
                "requested_tokens": self.config.ppl_tokens, "window": self.config.ppl_window, "stride": self.config.ppl_stride}
        return SuiteResult(self.name, metrics, records, dict(self.files), info)


class WikiTextSuite(PerplexitySuite):
    """WikiText-2 (raw) test split, joined the way HF perplexity evaluations join it."""

    name = "wikitext"

    def load_text(self) -> str:
        if self.config.data_dir is None:
            raise UserError("the wikitext suite reads benchmark data; pass --data-dir pointing at the shared data folder")
        path = Path(self.config.data_dir) / "wikitext2" / "wiki.test.raw"
        if not path.is_file():
            raise DataError(path, "WikiText-2 test file not found", fix="pass --data-dir pointing at the shared data folder")
        try:
            with open(path, encoding="utf-8") as f:
                rows = [line if line.strip() else "" for line in f]  # blank rows are stored as " \n"
        except UnicodeDecodeError as e:
            raise DataError(path, f"not UTF-8: {e}") from None
        text = "\n\n".join(rows)
        if not text.strip():
            raise DataError(path, "file is empty", fix="re-download it, or point --data-dir at the shared data folder")
        self.files[str(path)] = sha256_file(path)
        return text


_UNDERLINE = re.compile(r"^([*=\-~^\"#+])\1{2,}\s*$")


def stdlib_prose() -> tuple[str, Path]:
    """English prose from the Python reference documentation bundled with CPython (pydoc_data).

    It ships with every Python install, so the default utility check needs no download and no
    committed corpus. Only prose paragraphs are kept (no headings, code, grammar or tables), topics in
    sorted order. The text differs between Python versions, so `files` records the source's sha256:
    compare perplexities only between runs on the same Python.
    """
    try:
        from pydoc_data import topics as module
    except ImportError:
        raise UserError("the text suite needs the standard library's pydoc_data, which this Python lacks; use the wikitext suite instead") from None
    paragraphs = []
    for key in sorted(module.topics):
        for para in module.topics[key].split("\n\n"):
            lines = para.strip("\n").split("\n")
            if not para.strip() or any(l[:1].isspace() or l[:1] in "+|" or _UNDERLINE.match(l) for l in lines):
                continue
            joined = " ".join(l.strip() for l in lines)
            if len(joined.split()) >= 8 and joined[-1] in ".:?!":
                paragraphs.append(joined)
    return "\n\n".join(paragraphs), Path(module.__file__)


class TextSuite(PerplexitySuite):
    """The embedded default utility suite: no data directory needed."""

    name = "text"

    def load_text(self) -> str:
        text, path = stdlib_prose()
        self.files[str(path)] = sha256_file(path)
        self.python = sys.version.split()[0]
        return text

    def score(self, runs, nlls) -> SuiteResult:
        result = super().score(runs, nlls)
        result.info["python"] = self.python
        return result
