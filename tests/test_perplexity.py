"""Perplexity suites: hand-computed perplexity, chunk split, token budget, data errors."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fakes import TableScorer
from repair.errors import DataError, UserError
from repair.suites.base import EvalConfig, assign_splits
from repair.suites.perplexity import TextSuite, WikiTextSuite, plan_runs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_SHA = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def word_tokenizer(n_words: int = 200) -> PreTrainedTokenizerFast:
    """A real HF fast tokenizer, one token per whitespace-separated word: w<i> -> id i, others -> 0."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, n_words + 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def parity_nll(ids):
    """NLL 1 for even token ids, 3 for odd ones."""
    return np.where(np.asarray(ids) % 2 == 0, 1.0, 3.0)


class Recorder(TableScorer):
    def __init__(self, fn_nll, tokenizer=None):
        super().__init__(lambda p, o: (0.0, 1), tokenizer=tokenizer, fn_nll=fn_nll)
        self.nll_calls = []

    def token_nll(self, token_ids, window, stride, desc=""):
        self.nll_calls.append((np.asarray(token_ids).tolist(), window, stride, desc))
        return super().token_nll(token_ids, window, stride, desc)


@pytest.fixture
def wiki_dir(tmp_path):
    """WikiText layout with 100 words w1..w100 over a few rows (blank rows stored as ' ')."""
    words = [f"w{i}" for i in range(1, 101)]
    rows = [" ", " " + " ".join(words[:40]), " ", " " + " ".join(words[40:])]
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("".join(r + "\n" for r in rows))
    return tmp_path


def cfg(data_dir, **kw):
    kw = {"ppl_tokens": 40, "ppl_window": 10, "ppl_stride": 5, **kw}
    return EvalConfig(data_dir=data_dir, **kw)


def test_perplexity_equals_hand_value(wiki_dir):
    scorer = Recorder(parity_nll)
    result = WikiTextSuite(cfg(wiki_dir), tokenizer=word_tokenizer()).run(scorer)
    # split "all": one run of the first 41 tokens (ids 1..41); ids 2..41 are scored: 20 even, 20 odd
    assert scorer.nll_calls == [(list(range(1, 42)), 10, 5, "wikitext")]
    assert result.info["n_tokens"] == 40
    assert result.metrics["overall/nll"].value == pytest.approx(2.0)
    ppl = result.metrics["overall/perplexity"]
    assert ppl.value == pytest.approx(math.exp(2.0))
    assert ppl.better == "lower" and ppl.n == 40  # n counts scored tokens
    assert ppl.ci_low <= ppl.value <= ppl.ci_high
    # per chunk: chunk 0 scores ids 2..10 (5 even, 4 odd), chunk 1 ids 11..20, ..., chunk 4 only id 41
    assert [(r["chunk"], r["n_tokens"], r["nll_sum"]) for r in result.records] == [
        (0, 9, 5 * 1 + 4 * 3), (1, 10, 20.0), (2, 10, 20.0), (3, 10, 20.0), (4, 1, 3.0)]


def test_uneven_perplexity_is_token_weighted(wiki_dir):
    # NLL = token id / 10: scored ids 2..11 -> mean 6.5 / 10
    result = WikiTextSuite(cfg(wiki_dir, ppl_tokens=10), tokenizer=word_tokenizer()).run(Recorder(lambda ids: ids / 10))
    assert result.metrics["overall/perplexity"].value == pytest.approx(math.exp(0.65))
    assert result.metrics["overall/nll"].value == pytest.approx(0.65)


@pytest.mark.parametrize("split, tokens", [("all", 37), ("all", 1000), ("search", 25), ("search", 1000), ("select", 1000), ("report", 1000)])
def test_token_budget_and_split(wiki_dir, split, tokens):
    scorer = Recorder(parity_nll)
    result = WikiTextSuite(cfg(wiki_dir, split=split, ppl_tokens=tokens), tokenizer=word_tokenizer()).run(scorer)
    sides = assign_splits(range(10))  # 100 tokens -> 10 chunks of 10
    chosen = [c for c in range(10) if split == "all" or sides[c] == split]
    # every run is contiguous text made of whole selected chunks (the last one maybe cut)
    for ids, *_ in scorer.nll_calls:
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert all(sides[(i - 1) // 10] in ((split,) if split != "all" else ("search", "select", "report")) for i in ids)
    n_runs = len(scorer.nll_calls)
    available = 10 * len(chosen) - n_runs
    assert result.info["n_tokens"] == min(tokens, available) == sum(r["n_tokens"] for r in result.records)
    assert result.info["n_runs"] == n_runs
    if tokens >= available:
        assert [r["chunk"] for r in result.records] == chosen
    assert {r["split"] for r in result.records} <= ({split} if split != "all" else {"search", "select", "report"})


def test_search_and_report_chunks_are_disjoint(wiki_dir):
    tok = word_tokenizer()
    seen = {}
    for split in ("search", "select", "report"):
        result = WikiTextSuite(cfg(wiki_dir, split=split, ppl_tokens=1000), tokenizer=tok).run(Recorder(parity_nll))
        seen[split] = {r["chunk"] for r in result.records}
    assert not (seen["search"] & seen["report"] or seen["search"] & seen["select"] or seen["select"] & seen["report"])
    assert seen["search"] | seen["select"] | seen["report"] == set(range(10))
    assert (len(seen["select"]), len(seen["report"])) == (2, 3)


def test_plan_runs_cuts_last_chunk():
    runs = plan_runs(n_total=95, window=10, max_scored=23, split="all")
    assert len(runs) == 1 and [(c.start, c.stop) for c in runs[0]] == [(0, 10), (10, 20), (20, 24)]
    # the last, short chunk of the text
    runs = plan_runs(n_total=95, window=10, max_scored=10_000, split="all")
    assert runs[0][-1].stop == 95 and len(runs[0]) == 10


def test_scorer_tokenizer_is_used_and_simple_tokenizers_work(wiki_dir):
    class Simple:
        """No `verbose` argument, result with an `input_ids` attribute, like tests/tiny.py's tokenizer."""

        def __call__(self, text, add_special_tokens=True):
            return SimpleNamespace(input_ids=[int(w[1:]) for w in text.split()])

    scorer = Recorder(parity_nll, tokenizer=Simple())
    result = WikiTextSuite(cfg(wiki_dir)).run(scorer)
    assert scorer.nll_calls[0][0] == list(range(1, 42))
    assert result.metrics["overall/perplexity"].value == pytest.approx(math.exp(2.0))


def test_wiki_rows_joined_like_hf(wiki_dir):
    suite = WikiTextSuite(cfg(wiki_dir))
    words = " ".join(f"w{i}" for i in range(1, 41))
    assert suite.text.startswith("\n\n " + words + "\n\n\n\n\n w41")
    path = wiki_dir / "wikitext2" / "wiki.test.raw"
    assert suite.files == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}


def test_errors_before_model_work(tmp_path, wiki_dir):
    with pytest.raises(DataError, match=r"wiki\.test\.raw.*--data-dir"):
        WikiTextSuite(cfg(tmp_path / "empty"))
    with pytest.raises(UserError, match="data-dir"):
        WikiTextSuite(EvalConfig())
    for bad in ({"ppl_stride": 11}, {"ppl_stride": 0}, {"ppl_window": 1}, {"ppl_tokens": 0}):
        with pytest.raises(UserError, match="ppl"):
            WikiTextSuite(cfg(wiki_dir, **bad))
        with pytest.raises(UserError, match="ppl"):
            TextSuite(cfg(None, **bad))
    (wiki_dir / "wikitext2" / "wiki.test.raw").write_text(" \n \n")
    with pytest.raises(DataError, match="empty"):
        WikiTextSuite(cfg(wiki_dir))


def test_split_without_tokens_is_a_user_error(wiki_dir):
    # a single chunk is never held out, so "report" is empty
    suite = WikiTextSuite(cfg(wiki_dir, ppl_window=200, split="report"), tokenizer=word_tokenizer())
    with pytest.raises(UserError, match="no tokens"):
        suite.run(Recorder(parity_nll))


def test_text_suite_ships_with_python():
    suite = TextSuite(EvalConfig())  # no data dir needed
    assert len(suite.text.split()) > 20_000
    assert suite.text == TextSuite(EvalConfig()).text
    assert "*****" not in suite.text and "\n " not in suite.text  # headings and code blocks dropped
    (path, digest), = suite.files.items()
    assert path.endswith("topics.py") and len(digest) == 64

    tok = word_tokenizer()
    result = suite.run(Recorder(lambda ids: np.full(len(ids), 0.5), tokenizer=tok))
    assert result.info["n_tokens"] == 4096  # the default budget
    assert result.metrics["overall/perplexity"].value == pytest.approx(math.exp(0.5))
    report = TextSuite(EvalConfig(split="report")).run(Recorder(lambda ids: np.full(len(ids), 0.5), tokenizer=tok))
    assert report.info["n_tokens"] == 4096
    assert {r["split"] for r in report.records} == {"report"}


@pytest.mark.skipif(not (SHARED / "wikitext2" / "wiki.test.raw").is_file(), reason=f"shared data not found at {SHARED}")
def test_real_wikitext_loads():
    suite = WikiTextSuite(EvalConfig(data_dir=SHARED))
    assert list(suite.files.values()) == [WIKI_SHA]
    assert suite.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert sum(1 for line in suite.text.split("\n") if line.strip()) == 2891  # the README's non-empty rows
    result = suite.run(Recorder(lambda ids: np.full(len(ids), 1.0), tokenizer=word_tokenizer()))
    assert result.info["n_tokens"] == 4096


def test_interval_resamples_token_blocks(wiki_dir):
    """Two halves with different NLL: the interval must be wide, from blocks, even within one chunk."""
    from repair.suites import perplexity

    suite = WikiTextSuite(cfg(wiki_dir), tokenizer=word_tokenizer())
    nll = np.r_[np.full(2 * perplexity.BLOCK, 1.0), np.full(2 * perplexity.BLOCK, 3.0)]
    runs = [[perplexity.Chunk(0, "search", 0, len(nll) + 1)]]
    result = suite.score(runs, [nll])
    ppl = result.metrics["overall/perplexity"]
    assert ppl.value == pytest.approx(math.exp(2.0))
    assert ppl.ci_low < math.exp(1.8) and ppl.ci_high > math.exp(2.2)
