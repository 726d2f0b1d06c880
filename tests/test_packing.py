"""Items that share tokens share them in one row's prefix tree (repair.packing): every item scores what it
scores alone, and a tree computes each distinct token path once."""
import numpy as np
import pytest
import torch

from repair import packing
from repair.evaluator import Evaluator, ReferenceScorer
from repair.suites.base import ChoiceRequest
from tiny import ByteTokenizer, tiny_gpt2, tiny_llama

REQUESTS = [
    ChoiceRequest("The cook said", (" yes", " no")),
    ChoiceRequest("The cook said", (" nothing", " no")),  # the same prompt with other options
    ChoiceRequest("The cook", (" said yes", " left")),  # a prompt inside another, an option along it
    ChoiceRequest("The cook said yes", (" twice",), word_end=True),  # the pairs' pattern: an option's path as a prompt
    ChoiceRequest("The driver was", (" late", " lazy"), word_end=True),
    ChoiceRequest("A different start", (" here",)),
]


def distinct_paths(encoded) -> int:
    """Tokens a tree of `encoded` must hold, counted independently: every distinct prefix of every fed path."""
    nodes = set()
    for prompt, options, word_end in encoded:
        nodes |= {tuple(prompt[:k]) for k in range(1, len(prompt) + 1)}
        for option in options:
            path = tuple(prompt) + tuple(option if word_end else option[:-1])
            nodes |= {path[:k] for k in range(1, len(path) + 1)}
    return len(nodes)


def test_a_tree_is_laid_out_by_hand():
    # item 1: prompt 1 2, options 3 4 and 3 5 (the last token is not fed): nodes 1, 2, 3 in a chain
    # item 2: prompt 1 6, option 7 with its word end: 6 under 1, 7 under 6
    p = packing.build([[([1, 2], [[3, 4], [3, 5]], False), ([1, 6], [[7]], True)]], "cpu")
    assert p.ids.tolist() == [[1, 2, 3, 6, 7]]
    assert p.parent.tolist() == [[-1, 0, 1, 0, 3]]
    assert p.position.tolist() == [[0, 1, 2, 1, 2]]
    want = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(p.sees[0].numpy(), want)
    terms = sorted(zip(p.term_option.tolist(), p.term_node.tolist(), p.term_target.tolist()))
    assert terms == [(0, 1, 3), (0, 2, 4), (1, 1, 3), (1, 2, 5), (2, 3, 7), (2, 4, packing.WORD_END)]
    assert p.keep.tolist() == [[False, True, True, True, True]] and p.n_options == 3


def test_pack_merges_items_that_share_more_than_the_first_token():
    tok = ByteTokenizer(add_bos=True)
    encoded = [_encode(tok, r) for r in REQUESTS]
    rows, widths = packing.pack(encoded, 10_000)
    assert sorted(map(sorted, rows)) == [[0, 1, 2, 3, 4], [5]]  # "A different start" shares only the BOS
    assert sorted(i for row in rows for i in row) == list(range(len(REQUESTS)))
    assert sorted(packing.pack(encoded, 1)[0]) == [[i] for i in range(len(REQUESTS))]  # no room: each item alone
    for row, w in zip(rows, widths):
        assert packing.width([encoded[i] for i in row]) == w == distinct_paths([encoded[i] for i in row])


def _encode(tok, request):
    from repair.evaluator import _Tokens
    return _Tokens(tok).request(request)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("row_tokens, vocab_rows", [(1, 64), (256, 64), (256, 1)])
def test_trees_score_what_each_item_scores_alone(make, row_tokens, vocab_rows, monkeypatch):
    monkeypatch.setattr("repair.evaluator.VOCAB_ROWS", vocab_rows)  # 1: each kept position's log-probs alone
    torch.manual_seed(0)
    model, tok = make(), ByteTokenizer(add_bos=True)
    fast = Evaluator(model, tok, row_tokens=row_tokens, progress=False)
    got = fast.score_choices(REQUESTS)
    want = ReferenceScorer(model, tok, progress=False).score_choices(REQUESTS)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprob, w.logprob, atol=1e-4)
    encoded = [_encode(tok, r) for r in REQUESTS]
    rows = [[0, 1, 2, 3, 4], [5]] if row_tokens == 256 else [[i] for i in range(len(REQUESTS))]
    assert fast.work.tokens == sum(distinct_paths([encoded[i] for i in row]) for row in rows)


def test_gradients_flow_through_trees():
    """option_logprobs (a head mask's gradient) reads the same trees: its totals equal the scores."""
    model, tok = tiny_llama(), ByteTokenizer(add_bos=True)
    ev = Evaluator(model, tok, progress=False)
    totals = ev.option_logprobs(REQUESTS)
    scores = ev.score_choices(REQUESTS)
    for t, s in zip(totals, scores):
        np.testing.assert_allclose(t.detach().numpy(), s.logprob, atol=1e-5)
    sum(t.sum() for t in totals).backward()
    assert next(model.parameters()).grad is not None
