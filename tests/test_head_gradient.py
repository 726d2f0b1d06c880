"""The fairness gradient over head masks: the torch form of the association metric equals the suite's
own (numpy) score, and its gradient equals finite differences of that independent implementation."""
import numpy as np
import pytest
import torch

from repair.evaluator import Evaluator
from repair.heads import HeadMasker, head_layout
from repair.masks import ranked_masks
from repair.objectives import ConfigEvaluator, Objectives
from repair.suites.association import AssociationSuite
from repair.suites.base import EvalConfig
from tiny import ByteTokenizer, tiny_llama

CONFIG = EvalConfig(split="search", limit=1, association_neutral=False, ppl_tokens=64)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=4).eval()
    tok = ByteTokenizer()
    layout = head_layout(model)[:2]
    masker = HeadMasker(model, torch.ones((1, *layout)))
    evaluator = Evaluator(model, tok, on_rows=masker.set_rows, progress=False)
    objective = ConfigEvaluator(Objectives.parse("association", "text"), CONFIG, tok)
    return model, tok, layout, masker, evaluator, objective


def fairness_at(masker, evaluator, objective, mask):
    masker.set_masks(torch.as_tensor(mask, dtype=torch.float32)[None])
    return objective.evaluate(evaluator, 1)[0]["fairness"]


def test_torch_metric_equals_the_suite_score(setup):
    model, tok, layout, masker, evaluator, objective = setup
    masker.set_masks(torch.ones((1, *layout)))
    suite = AssociationSuite(CONFIG)
    totals = evaluator.option_logprobs(suite.requests())
    via_torch = suite.differentiable("overall/kl_uniform", totals).item()
    via_numpy = suite.score(evaluator.score_choices(suite.requests())).metrics["overall/kl_uniform"].value
    assert via_torch == pytest.approx(via_numpy, rel=1e-6)
    assert suite.differentiable("overall/kl_neutral", totals) is None


def test_gradient_matches_finite_differences(setup):
    model, tok, layout, masker, evaluator, objective = setup
    grad = objective.fairness_gradient(evaluator, masker, layout)
    assert grad.shape == layout and np.abs(grad).max() > 0
    eps = 1e-2
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        up, down = np.ones(layout), np.ones(layout)
        up[layer, head] += eps
        down[layer, head] -= eps
        fd = (fairness_at(masker, evaluator, objective, up) - fairness_at(masker, evaluator, objective, down)) / (2 * eps)
        assert grad[layer, head] == pytest.approx(fd, rel=0.02, abs=1e-6), (layer, head)


def test_gradient_is_none_without_a_differentiable_objective(setup):
    model, tok, layout, masker, evaluator, _ = setup
    neutral = ConfigEvaluator(Objectives.parse("association-neutral", "text"),
                              EvalConfig(split="search", limit=1, ppl_tokens=64), tok)
    assert neutral.fairness_gradient(evaluator, masker, layout) is None


def test_ranked_masks_prune_the_heads_with_the_largest_gain():
    gain = np.array([[0.3, -1.0, 0.0], [0.5, 0.1, -0.2]])
    masks = ranked_masks(gain, (1, 2, 4, 9), max_pruned=3)
    pruned = [sorted(zip(*np.nonzero(~m))) for m in masks]
    assert pruned == [[(1, 0)], [(0, 0), (1, 0)], [(0, 0), (1, 0), (1, 1)]]  # only 3 heads help; cap 3
