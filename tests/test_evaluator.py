"""The fast evaluator must give the reference scorer's answers: same predictions, scores within 1e-4."""
import numpy as np
import pytest

from repair.evaluator import Evaluator, ReferenceScorer, sliding_windows
from repair.suites.base import ChoiceRequest
from tiny import ByteTokenizer, tiny_gpt2, tiny_llama


def _requests(seed=0, n=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = f"Item {i}: " + "word " * int(rng.integers(0, 12))
        options = tuple(" " + "ab"[j % 2] * int(rng.integers(1, 6)) for j in range(int(rng.integers(2, 5))))
        out.append(ChoiceRequest(prompt.rstrip(), options))
    out.append(ChoiceRequest("Letters only", (" A", " B", " C")))  # two-token options with the space
    out.append(ChoiceRequest("One", ("x", "y")))  # single-token options: no continuation pass
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("batch_tokens", [40, 4096])
def test_fast_matches_reference(make, batch_tokens):
    model, tok = make(), ByteTokenizer(add_bos=True)
    reqs = _requests()
    fast = Evaluator(model, tok, batch_tokens=batch_tokens, progress=False).score_choices(reqs)
    ref = ReferenceScorer(model, tok, progress=False).score_choices(reqs)
    for f, r, q in zip(fast, ref, reqs):
        assert f.n_tokens.tolist() == [len(o.encode()) for o in q.options]
        np.testing.assert_allclose(f.logprob, r.logprob, atol=1e-4)
        best = np.sort(r.mean_logprob)[::-1]
        if len(best) < 2 or best[0] - best[1] > 1e-4:  # identical options tie; their order is arbitrary
            assert np.argmax(f.mean_logprob) == np.argmax(r.mean_logprob)


def test_scores_are_true_log_probabilities():
    """Over every continuation of one token, the probabilities sum to one."""
    model, tok = tiny_llama(), ByteTokenizer()
    options = tuple(chr(b) for b in range(32, 127))  # printable ASCII: 95 of the 259 ids
    ev = Evaluator(model, tok, progress=False)
    (scores,) = ev.score_choices([ChoiceRequest("Hello", options)])
    all_ids = ev.tokens  # complement: the other ids, scored via the full distribution
    import torch
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([all_ids("Hello", True)])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)[[ord(c) + 1 for c in options]].numpy()
    np.testing.assert_allclose(scores.logprob, expected, atol=1e-5)


def test_sliding_windows_score_each_token_once():
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, w, s in [(1, 4, 2), (2, 4, 4), (100, 16, 5), (513, 512, 256)]:
        covered = [t for _, e, t0 in sliding_windows(n, w, s) for t in range(t0, e)]
        assert covered == list(range(1, n))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_token_nll_matches_reference(make):
    model, tok = make(), ByteTokenizer()
    ids = np.random.default_rng(1).integers(1, 256, size=301)
    fast = Evaluator(model, tok, batch_tokens=150, progress=False).token_nll(ids, window=64, stride=24)
    ref = ReferenceScorer(model, tok, progress=False).token_nll(ids, window=64, stride=24)
    assert fast.shape == (300,)
    np.testing.assert_allclose(fast, ref, atol=1e-4)


def test_evaluator_counts_only_needed_output_positions():
    model, tok = tiny_llama(), ByteTokenizer()
    ev = Evaluator(model, tok, progress=False)
    ev.score_choices([ChoiceRequest("abc", ("x", "yz"))])
    # last prompt position + tokens 2.. of each option: 1 + (0 + 1) = 2 positions, not 3 + 1 + 2
    assert ev.work.head_positions == 2
    ev.work.__init__()
    ev.score_choices([ChoiceRequest("abc", (" x", " yz"))])
    # both options start with the byte " ": it is fed once and predicts both "x" and "y", so the tree is
    # a b c " " y (5 tokens, not 3 + 2 + 3 - 2 = 6 fed) read at c, " " and y
    assert (ev.work.tokens, ev.work.head_positions) == (5, 3)


def test_the_table_counts_boundary_merges_only_when_there_are_some():
    from repair.evaluate import format_table

    metric = {"value": 1.0, "ci_low": 0.5, "ci_high": 1.5, "n": 3, "better": "lower"}
    report = {"suites": {"text": {"metrics": {"overall/perplexity": metric}, "info": {}}}, "boundary_merges": 0}
    assert "merge across the prompt boundary" not in format_table(report)
    report["boundary_merges"] = 7
    row = [l for l in format_table(report).splitlines() if "merge across the prompt boundary" in l]
    assert len(row) == 1 and " 7" in row[0]
