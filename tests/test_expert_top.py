"""Experts that share the target's trunk (repair.methods.experts.top): an expert whose lower layers
are the target's, stored and run as its trained top layers alone over the target's hidden state,
gives the full expert model's numbers to float tolerance, in the search's evaluator (scores and
perplexity, every variant of one shared forward), in the repaired model's forward with its KV cache,
and in generation (greedy, beam search); it holds K layers' weights instead of a model's; saved and
loaded back it is the same; a top for a model of another depth is refused."""
import copy

import numpy as np
import pytest
import torch

from repair.evaluator import Evaluator
from repair.methods.experts.top import ExpertTop, is_top, load_top
from repair.methods.experts.transform import ExpertSetting, ExpertsTransform
from test_experts import REQUESTS, SETTINGS
from tiny import ByteTokenizer, tiny_llama

K = 2  # of the tiny model's 3 layers


def _expert(target, seed: int):
    """A full copy of `target` whose top K layers were changed (as training changes them)."""
    model = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers[-K:]:
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def pair():
    """(target, full experts, their tops)."""
    target = tiny_llama(0)
    full = (_expert(target, 1), _expert(target, 2))
    return target, full, tuple(ExpertTop.from_model(target, m, K) for m in full)


def test_tops_hold_k_layers_and_none_of_the_targets_weights(pair):
    target, full, tops = pair
    per_layer = sum(p.numel() for p in target.model.layers[0].parameters())
    assert sum(p.numel() for p in tops[0].parameters()) == K * per_layer
    rest = sum(p.numel() for p in full[0].parameters()) - K * per_layer  # the trunk, the norm, the embeddings: the target's
    assert rest == sum(p.numel() for p in target.parameters()) - K * per_layer and tops[0].start == 1


def test_the_evaluator_scores_tops_as_it_scores_the_full_experts(pair, one_torch_thread):
    target, full, tops = pair
    tok = ByteTokenizer()
    ids = list(range(3, 40))
    got = {}
    for name, models in (("full", full), ("tops", tops)):
        ev = Evaluator(target, tok, transform=ExpertsTransform(target, *models, SETTINGS), progress=False)
        got[name] = (ev.score_choices_variants(REQUESTS, len(SETTINGS)), ev.token_nll_variants(ids, 16, 8, len(SETTINGS)))
    for v in range(len(SETTINGS)):
        for a, b in zip(got["full"][0][v], got["tops"][0][v]):
            np.testing.assert_allclose(a.logprob, b.logprob, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["full"][1], got["tops"][1], rtol=0, atol=1e-4)
    assert not np.allclose(got["tops"][1][0], got["tops"][1][1])  # alpha 1.5 changed something


def _attached(target, models, fn, setting):
    transform = ExpertsTransform(target, *models, [setting]).attach()
    folded = bool(target.get_output_embeddings()._forward_pre_hooks)
    try:
        with torch.no_grad():
            return fn(), folded
    finally:
        transform.remove()


PROMPTS = {"input_ids": torch.tensor([[0, 0, 84, 105, 33, 9], [84, 104, 101, 32, 110, 117]]),
           "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}


@pytest.mark.parametrize("setting", [ExpertSetting(2.0), ExpertSetting(8.0, "probs")])
def test_the_repaired_forward_cache_and_generation_equal_the_full_experts(pair, setting, one_torch_thread):
    """Rule `logits` folds the tops' shift into the target's head (one vocabulary projection per
    token); rule `probs` combines three heads' logits: both give the full experts' numbers."""
    target, full, tops = pair
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])

    def run():
        whole = target(ids).logits
        out = target(ids[:, :4], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        step = target(ids[:, 4:], cache=cache).logits
        greedy = target.generate(**PROMPTS, max_new_tokens=8, do_sample=False, pad_token_id=0)
        beams = target.generate(**PROMPTS, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        beams_uncached = target.generate(**PROMPTS, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                                         use_cache=False)
        return whole, torch.cat([out.logits, step], 1), greedy, beams, beams_uncached

    (a, folded_full), (b, folded) = _attached(target, full, run, setting), _attached(target, tops, run, setting)
    assert not folded_full and folded == (setting.rule == "logits")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(b[1], b[0], rtol=0, atol=1e-4)  # cached equals uncached
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) and torch.equal(b[3], b[4])
    with torch.no_grad():
        assert not torch.allclose(b[0], target(ids).logits, atol=1e-3)  # the shift is there


def test_a_saved_top_loads_back_the_same_and_another_depth_is_refused(pair, tmp_path):
    target, _, tops = pair
    tops[0].save_pretrained(tmp_path / "expert")
    assert is_top(tmp_path / "expert") and not (tmp_path / "expert" / "model.safetensors").exists()
    again = load_top(tmp_path / "expert", target)
    assert all(torch.equal(p, q) for p, q in zip(tops[0].state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="the target has 4 layers"):
        load_top(tmp_path / "expert", tiny_llama(0, num_hidden_layers=4))


def test_tops_built_while_the_target_is_hooked_carry_none_of_its_hooks(pair, tmp_path, one_torch_thread):
    """In a stack the other parts' hooks (a neutralizer, steering) are the target's: tops built or loaded
    while they are attached run without them, as the full expert models do. (Copied with them, the
    tops of a FairMed + experts stack neutralized their own layers too, and its export failed the
    reload check.)"""
    target, full, tops = pair
    for role, top in zip(("expert", "anti"), tops):
        top.save_pretrained(tmp_path / role)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    setting = ExpertSetting(2.0)
    handle = target.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: out * 3)
    try:
        built = tuple(ExpertTop.from_model(target, m, K) for m in full)
        loaded = tuple(load_top(tmp_path / role, target) for role in ("expert", "anti"))
        assert not any(getattr(m, name) for top in built + loaded for m in top.modules()
                       for name in ("_forward_hooks", "_forward_pre_hooks"))
        want, _ = _attached(target, full, lambda: target(ids).logits, setting)
        for models in (built, loaded):
            got, _ = _attached(target, models, lambda: target(ids).logits, setting)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    finally:
        handle.remove()
    with torch.no_grad():  # the hook changed the repaired target's logits: it was there to be copied
        assert not torch.allclose(want, _attached(target, full, lambda: target(ids).logits, setting)[0], atol=1e-3)
