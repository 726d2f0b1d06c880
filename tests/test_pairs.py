"""The pairs suite: its data (each pair differs only in the group), its metrics on hand-made scores,
its gaps against sentence log-likelihoods from plain forwards, and that no search may optimise it."""
import json

import numpy as np
import pytest
import torch

from repair.errors import UserError
from repair.objectives import Objectives
from repair.suites.base import EvalConfig, OptionScores
from repair.suites.pairs import PairsSuite, _data_path, load_pairs


def test_every_attribute_has_at_least_50_pairs_that_differ_only_in_the_group():
    data = json.loads(_data_path().read_text())
    association = json.loads((_data_path().parent / "association.json").read_text())["attributes"]
    assert set(data["attributes"]) == set(association)
    pairs, _ = load_pairs()
    for attr in association:
        mine = [p for p in pairs if p.attribute == attr]
        assert len(mine) >= 50
        for p in mine:
            assert set(p.groups) <= set(association[attr]["groups"]) and p.groups[0] != p.groups[1] and p.source
            s, a = (p.prefix + p.stereotyped).split(), (p.prefix + p.anti).split()
            # the same words before and after the group span
            k = next(i for i, (x, y) in enumerate(zip(s, a)) if x != y)
            j = next(i for i, (x, y) in enumerate(zip(reversed(s), reversed(a))) if x != y)
            assert s[:k] == a[:k] and s[len(s) - j:] == a[len(a) - j:]


def test_metrics_from_hand_made_scores():
    suite = PairsSuite(EvalConfig(attributes=("age",), limit=4))
    gaps = [1.5, -0.5, 0.0, 2.0]  # preferred: 1, 0, 1/2, 1
    conds = [-1.0, 0.25, 0.0, -2.0]  # preferred: 0, 1, 1/2, 0
    outputs = [o for g, c in zip(gaps, conds) for o in (
        OptionScores(np.array([g - 3.0, -3.0]), np.array([2, 2])),
        OptionScores(np.array([c - 5.0]), np.array([3])), OptionScores(np.array([-5.0]), np.array([3])))]
    result = suite.score(outputs)
    assert result.metrics["overall/cond_stereotype_preferred"].value == pytest.approx(1.5 / 4)
    assert result.metrics["age/cond_mean_gap"].value == pytest.approx(np.mean(conds))
    assert [r["cond_gap"] for r in result.records] == pytest.approx(conds)
    assert result.metrics["overall/stereotype_preferred"].value == pytest.approx(2.5 / 4)
    assert result.metrics["age/mean_gap"].value == pytest.approx(np.mean(gaps))
    assert result.metrics["overall/stereotype_preferred"].better == "closer-to-half"
    assert [r["gap"] for r in result.records] == pytest.approx(gaps)


def test_gaps_are_sentence_log_likelihood_differences_from_plain_forwards(one_torch_thread):
    from repair.evaluator import Evaluator
    from tiny import ByteTokenizer, tiny_llama

    model, tok = tiny_llama(0), ByteTokenizer(add_bos=True)
    suite = PairsSuite(EvalConfig(attributes=("gender", "ses"), limit=3))
    result = suite.run(Evaluator(model, tok, progress=False))

    def loglik(text):
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        return float(lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())

    for record, pair in zip(result.records, suite.pairs):
        assert record["gap"] == pytest.approx(loglik(record["stereotyped"]) - loglik(record["anti"]), abs=1e-3)
        # conditional: the sentence's log-likelihood minus that of its words up to the group, per side
        heads = [f"{pair.prefix} {t}" for t in pair.texts]
        expected = (loglik(heads[0] + pair.rest) - loglik(heads[0])) - (loglik(heads[1] + pair.rest) - loglik(heads[1]))
        assert record["cond_gap"] == pytest.approx(expected, abs=1e-3)


def test_no_search_may_optimise_the_pairs():
    with pytest.raises(UserError, match="--fairness pairs: the pairs suite is the check no search optimises"):
        Objectives.parse("pairs", "text")
    with pytest.raises(UserError, match="--fairness pairs"):
        Objectives.parse("association-neutral,pairs:0.5", "text")
