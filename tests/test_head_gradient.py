"""The fairness gradient over head masks: the torch form of the association metrics (KL to uniform and
KL to the neutral reference) equals the suite's own (numpy) score, and its gradient equals finite
differences of that independent implementation."""
import numpy as np
import pytest
import torch

from repair.evaluator import Evaluator
from repair.methods.prune.heads import HeadMasker, head_layout
from repair.methods.prune.masks import ranked_masks
from repair.objectives import ConfigEvaluator, Objectives
from repair.suites.association import AssociationSuite
from repair.suites.base import EvalConfig
from tiny import ByteTokenizer, tiny_llama

CONFIG = EvalConfig(split="search", limit=1, association_neutral=False, ppl_tokens=64)
# With the neutral reference: two concept and two neutral prompts per attribute, so q is a mean.
CONFIG_NEUTRAL = EvalConfig(split="search", limit=2, association_neutral=True, ppl_tokens=64)
FAIRNESS = {"association": CONFIG, "association-neutral": CONFIG_NEUTRAL}
METRIC = {"association": "overall/kl_uniform", "association-neutral": "overall/kl_neutral"}


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=4).eval()
    tok = ByteTokenizer()
    layout = head_layout(model)[:2]
    masker = HeadMasker(model, torch.ones((1, *layout)))
    evaluator = Evaluator(model, tok, on_rows=masker.set_rows, progress=False)
    objectives = {name: ConfigEvaluator(Objectives.parse(name, "text"), cfg, tok) for name, cfg in FAIRNESS.items()}
    return model, tok, layout, masker, evaluator, objectives


def fairness_at(masker, evaluator, objective, mask):
    masker.set_masks(torch.as_tensor(mask, dtype=torch.float32)[None])
    return objective.evaluate(evaluator, 1)[0]["fairness"]


@pytest.mark.parametrize("name", ["association", "association-neutral"])
def test_torch_metric_equals_the_suite_score(setup, name):
    model, tok, layout, masker, evaluator, _ = setup
    masker.set_masks(torch.ones((1, *layout)))
    suite = AssociationSuite(FAIRNESS[name])
    assert any(p.neutral for p in suite.prompts) == (name == "association-neutral")
    totals = evaluator.option_logprobs(suite.requests())
    metrics = suite.score(evaluator.score_choices(suite.requests())).metrics
    for key in [METRIC[name], *(f"{a}/{METRIC[name].split('/')[1]}" for a in suite.attributes[:2])]:
        via_torch = suite.differentiable(key, totals).item()
        assert via_torch == pytest.approx(metrics[key].value, rel=1e-6), key


def test_no_torch_metric_where_the_suite_has_none(setup):
    model, tok, layout, masker, evaluator, objectives = setup
    suite = AssociationSuite(CONFIG)  # no neutral prompts loaded: no reference, no kl_neutral
    totals = evaluator.option_logprobs(suite.requests())
    assert suite.differentiable("overall/kl_neutral", totals) is None
    assert suite.differentiable("overall/perplexity", totals) is None
    assert suite.differentiable("astrology/kl_uniform", totals) is None


@pytest.mark.parametrize("name", ["association", "association-neutral"])
def test_gradient_matches_finite_differences(setup, name):
    model, tok, layout, masker, evaluator, objectives = setup
    objective = objectives[name]
    grad = objective.fairness_gradient(evaluator, masker, layout)
    assert grad.shape == layout and np.abs(grad).max() > 0
    eps = 1e-2
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        up, down = np.ones(layout), np.ones(layout)
        up[layer, head] += eps
        down[layer, head] -= eps
        fd = (fairness_at(masker, evaluator, objective, up) - fairness_at(masker, evaluator, objective, down)) / (2 * eps)
        assert grad[layer, head] == pytest.approx(fd, rel=0.02, abs=1e-6), (name, layer, head)


def test_kl_neutral_gradient_flows_through_the_reference(setup):
    """Holding q fixed would give a different gradient: the neutral prompts depend on the mask too."""
    model, tok, layout, masker, evaluator, objectives = setup
    suite = AssociationSuite(CONFIG_NEUTRAL)
    mask = torch.ones((1, *layout), requires_grad=True)
    masker.set_masks(mask)
    totals = evaluator.option_logprobs(suite.requests())
    (full,) = torch.autograd.grad(suite.differentiable("overall/kl_neutral", totals), mask, retain_graph=True)
    detached = [t.detach() if p.neutral else t for p, t in zip(suite.prompts, totals)]
    (concept_only,) = torch.autograd.grad(suite.differentiable("overall/kl_neutral", detached), mask)
    masker.set_masks(torch.ones((1, *layout)))
    assert not torch.allclose(full, concept_only, rtol=1e-3, atol=1e-9)


def test_gradient_is_none_without_a_differentiable_objective(setup, monkeypatch):
    model, tok, layout, masker, evaluator, objectives = setup
    objective = objectives["association"]
    monkeypatch.setattr(objective.suites["association"], "differentiable", lambda metric, totals: None)
    assert objective.fairness_gradient(evaluator, masker, layout) is None


def test_ranked_masks_prune_the_heads_with_the_largest_gain():
    gain = np.array([[0.3, -1.0, 0.0], [0.5, 0.1, -0.2]])
    masks = ranked_masks(gain, (1, 2, 4, 9), max_pruned=3)
    pruned = [sorted(zip(*np.nonzero(~m))) for m in masks]
    assert pruned == [[(1, 0)], [(0, 0), (1, 0)], [(0, 0), (1, 0), (1, 1)]]  # only 3 heads help; cap 3
