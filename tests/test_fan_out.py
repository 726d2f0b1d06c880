"""The shared forward (repair.fanout): rows of one item under several configurations run once below
the first layer any of them changes and fan out there. Checked against separate forwards (the same
evaluator without sharing): on head masks of a tiny Llama and GPT-2, choices and perplexity alike,
counting the rows each layer sees; and through a run's own scorer, for every method of a
`--method all` run and their stack, on the held-out select split."""
import json

import numpy as np
import pytest
import torch

from repair import arch
from repair.evaluator import Evaluator
from repair.methods.prune.heads import HeadMasker, head_layout
from repair.suites.base import ChoiceRequest
from tiny import byte_bpe_tokenizer, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUESTS = [ChoiceRequest(p, (" man", " woman", " nurse")) for p in
            ("The doctor was a", "People who live here are", "The man and the woman were")]
TEXT = "The man and the woman were a doctor and a nurse. People who live here are kind. " * 3


def _masks(n_layers: int, n_heads: int, starts: list[int]) -> np.ndarray:
    """Variant 0 keeps every head; variant v masks random heads from layer starts[v - 1] up."""
    rng = np.random.default_rng(0)
    masks = np.ones((1 + len(starts), n_layers, n_heads), np.float32)
    for v, start in enumerate(starts, 1):
        masks[v, start:] = rng.integers(0, 2, (n_layers - start, n_heads))
        masks[v, start, 0] = 0  # the start layer surely changes
    return masks


def _model(family: str):
    return tiny_llama(num_hidden_layers=6) if family == "llama" else tiny_gpt2(n_layer=6)


class _RowsSeen:
    """How many rows each decoder layer's forwards had."""

    def __init__(self, model):
        self.rows: dict[int, list[int]] = {}
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(arch.decoder_layers(model))]

    def _hook(self, i):
        def hook(module, args, kwargs):
            self.rows.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).shape[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_forward_scores_what_separate_forwards_score(family):
    model = _model(family)
    n_layers, n_heads, _ = head_layout(model)
    starts = [2, 3, n_layers - 1]  # n_layers = 6
    masker = HeadMasker(model, _masks(n_layers, n_heads, starts))
    tokenizer = byte_bpe_tokenizer()
    separate = Evaluator(model, tokenizer, on_rows=masker.set_rows, progress=False)
    shared = Evaluator(model, tokenizer, on_rows=masker.set_rows, progress=False, first_layer=masker.first_layer)
    assert shared.shares_trunk and not separate.shares_trunk
    n = 1 + len(starts)

    want = separate.score_choices_variants(REQUESTS, n)
    got = shared.score_choices_variants(REQUESTS, n)
    for v in range(n):
        for a, b in zip(want[v], got[v]):
            np.testing.assert_allclose(b.logprob, a.logprob, rtol=0, atol=1e-5)
    assert not np.allclose(want[1][0].logprob, want[0][0].logprob)  # the masks do change the scores
    # one item, variants first changing layers 2, 3 and 5 (and the unrepaired model, split off at the last layer
    # for the head): one row up to layer 2, where variant 1 splits off, variant 2 at 3, the rest at 5
    seen = _RowsSeen(model)
    shared.score_choices_variants(REQUESTS[:1], n)
    seen.remove()
    assert [sum(seen.rows[i]) for i in range(n_layers)] == [1, 1, 2, 3, 3, 4]

    ids = tokenizer(TEXT).input_ids
    want_nll = separate.token_nll_variants(ids, 16, 8, n)
    np.testing.assert_allclose(shared.token_nll_variants(ids, 16, 8, n), want_nll, rtol=0, atol=1e-5)
    assert shared.work.tokens < separate.work.tokens


def test_the_fan_out_layer_is_the_batchs_first_change():
    """Variants that change only the top layer share every layer below it with the unrepaired model."""
    model = _model("llama")
    n_layers, n_heads, _ = head_layout(model)
    masker = HeadMasker(model, _masks(n_layers, n_heads, [n_layers - 1, n_layers - 1]))
    shared = Evaluator(model, byte_bpe_tokenizer(), on_rows=masker.set_rows, progress=False, first_layer=masker.first_layer)
    seen = _RowsSeen(model)
    shared.score_choices_variants(REQUESTS[:1], 3)
    seen.remove()
    assert [sum(seen.rows[i]) for i in range(n_layers)] == [1] * (n_layers - 1) + [3]


def test_without_a_change_every_variant_is_one_row_to_the_last_layer():
    """Identical variants (the unrepaired model twice) fan out at the last layer, not before."""
    model = _model("llama")
    n_layers, n_heads, _ = head_layout(model)
    masker = HeadMasker(model, np.ones((2, n_layers, n_heads), np.float32))
    assert masker.first_layer([0, 1]) is None
    separate = Evaluator(model, byte_bpe_tokenizer(), on_rows=masker.set_rows, progress=False)
    shared = Evaluator(model, byte_bpe_tokenizer(), on_rows=masker.set_rows, progress=False, first_layer=masker.first_layer)
    got, want = shared.score_choices_variants(REQUESTS, 2), separate.score_choices_variants(REQUESTS, 2)
    for v in range(2):
        for a, b in zip(want[v], got[v]):
            np.testing.assert_allclose(b.logprob, a.logprob, rtol=0, atol=1e-5)


def _numbers(row: dict) -> dict:
    """Every metric value of a scored row, with fairness and utility."""
    out = {"fairness": row["fairness"], "utility": row["utility"]}
    out.update({k: m["value"] for k, m in row["metrics"].items() if isinstance(m, dict) and "value" in m})
    return out


def test_a_runs_scorer_shares_the_trunk_for_every_method_and_the_stack(all_run):
    """The run's scorer, as a worker builds it, scores the run's verified configurations (the unrepaired
    model, each method's finalists, the stack) on the select split the same with and without sharing."""
    from conftest import as_a_worker
    from repair.objectives import Objectives
    from repair.runloop import SPLITS, Scorer, eval_config
    from repair.space import method_of

    config, loaded, methods, _ = as_a_worker(all_run)
    scorer = Scorer(loaded, Objectives.parse(config.fairness, config.utility), {s: eval_config(config, s) for s in SPLITS},
                    methods, config.panel_bbq_limit)
    try:
        assert scorer.evaluator.shares_trunk
        rows = [json.loads(line) for line in (all_run / "candidates.jsonl").read_text().splitlines()]
        keys = [r["key"] for r in rows]
        assert {"prune", "fairmed", "fairsteer", "experts", "stack"} <= {method_of(k) for k in keys}
        score = scorer.scorer("select")
        got = score(keys)
        shared_tokens = scorer.evaluator.work.tokens
        scorer.evaluator.shares_trunk = False
        scorer.evaluator.work.tokens = 0
        want = score(keys)
        assert shared_tokens < scorer.evaluator.work.tokens
    finally:
        scorer.close()
    for key, a, b in zip(keys, want, got):
        a, b = _numbers(a), _numbers(b)
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), (key, name)
    # and the run's own select-split numbers
    stored = {r["key"]: r["select"] for r in rows}
    for key, b in zip(keys, got):
        assert b["fairness"] == pytest.approx(stored[key]["fairness"], rel=1e-4, abs=1e-6), key


def test_the_unrepaired_models_held_out_outputs_are_computed_once_per_run(all_run):
    """Every comparison on a held-out split reads the unrepaired model's one stored evaluation there
    (its per-unit numbers give the paired intervals), stacks verified after the first choice included."""
    from conftest import study_trials

    storage, name = f"sqlite:///{all_run / 'study.db'}", f"repair-{all_run.name}"
    rows = [json.loads(line) for line in (all_run / "candidates.jsonl").read_text().splitlines()]
    assert any(r["method"] == "stack" for r in rows) and all(r["changes"]["select"] for r in rows[1:])
    for split in ("select", "report"):
        trials = study_trials(storage, f"{name}-{split}")
        assert [t.user_attrs["key"] for t in trials].count("base") == 1, split
        assert len(trials) > 2
