"""A repaired model is a model: after `repair.load`, `model(...)` returns the repaired logits for every
kind of checkpoint (pruned, FairMed, FairSteer, experts, a stack of pruned weights and experts), the
KV cache included, and plain `generate()` decodes them; removing the interventions gives back the
checkpoint's plain forward bit for bit; lm-evaluation-harness, handed the loaded model, scores what
the evaluator scores. Checked against second computations: uncached full forwards, a greedy decode
run by hand, a plain transformers load of the same folder."""
import json

import numpy as np
import pytest
import torch

import repair
from conftest import run_cli
from repair.evaluator import Evaluator
from repair.suites.base import ChoiceRequest

KINDS = ("prune", "fairmed", "fairsteer", "experts", "stack")
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 7, 100, 3, 64, 12]])
REQUESTS = [ChoiceRequest("The nurse was", (" a man", " a woman", " tired")),
            ChoiceRequest("People who live here are", (" kind.", " cold."))]


@pytest.fixture(scope="module")
def base(all_run):
    """The unrepaired model of the checkpoints (conftest.all_run's)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(all_run.parent / "model").eval()


def _loaded(all_run, kind):
    model, tokenizer = repair.load(all_run / "checkpoints" / kind)
    return model, tokenizer


def _cache_argument(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _by_hand(model, tokenizer, r: ChoiceRequest) -> list[float]:
    """Each option's log-probability from one full forward of prompt + option (no batching, no cache)."""
    n = len(tokenizer(r.prompt, add_special_tokens=False).input_ids)
    out = []
    for o in r.options:
        ids = tokenizer(r.prompt + o, add_special_tokens=False).input_ids
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(float(lp[p - 1, ids[p]]) for p in range(n, len(ids))))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits_are_the_evaluators_scores_and_not_the_unrepaired_models(all_run, base, kind):
    model, tokenizer = _loaded(all_run, kind)
    got = Evaluator(model, tokenizer, progress=False).score_choices(REQUESTS)
    for scores, r in zip(got, REQUESTS):
        np.testing.assert_allclose(scores.logprob, _by_hand(model, tokenizer, r), rtol=0, atol=2e-4)
    with torch.inference_mode():
        assert not torch.allclose(model(IDS).logits, base(IDS).logits, atol=1e-4)  # the repair is in the forward


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_forward_token_by_token_equals_the_uncached_forward(all_run, kind):
    model, _ = _loaded(all_run, kind)
    arg = _cache_argument(model)
    with torch.inference_mode():
        full = model(IDS).logits
        out = model(IDS[:, :5], use_cache=True)
        steps, cache = [out.logits], getattr(out, arg)
        for t in range(5, IDS.shape[1]):
            out = model(IDS[:, t:t + 1], use_cache=True, **{arg: cache})
            steps.append(out.logits)
            cache = getattr(out, arg)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_generate_is_a_greedy_decode_of_the_forward_run_by_hand(all_run, kind):
    model, _ = _loaded(all_run, kind)
    ids = IDS[:, :4]
    with torch.inference_mode():
        got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
        want = ids[0].tolist()
        for _ in range(8):
            want.append(int(model(torch.tensor([want])).logits[0, -1].argmax()))
        beams = {c: model.generate(IDS[:, :6], max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                                   use_cache=c) for c in (True, False)}
    assert got == want
    assert torch.equal(beams[True], beams[False])  # beam reordering reaches every cache (the experts' too)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_gives_the_checkpoints_plain_forward_bit_for_bit(all_run, kind):
    from transformers import AutoModelForCausalLM

    folder = all_run / "checkpoints" / kind
    model, _ = _loaded(all_run, kind)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        repaired = model(IDS).logits
        for hook in model.repair_interventions:
            hook.remove()
        assert torch.equal(model(IDS).logits, plain(IDS).logits)
        assert kind == "prune" or not torch.equal(repaired, plain(IDS).logits)


# ---- lm-evaluation-harness ------------------------------------------------------------------------
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is installed by bin/test (the [lm-eval] extra)")


def _harness_loglikelihoods(model, tokenizer, tmp_path, limit=1) -> tuple[list, list[list[float]]]:
    from repair.harness import run_harness

    result = run_harness(model, tokenizer, ["repair_pairs"], limit=limit, log_samples=True, workdir=tmp_path)
    samples = sorted(result["samples"]["repair_pairs"], key=lambda s: s["doc_id"])
    return samples, [[r[0][0] for r in s["resps"]] for s in samples]


@pytest.mark.parametrize("kind", KINDS)
def test_lm_eval_scores_what_the_evaluator_scores_on_the_repaired_model(all_run, base, kind, tmp_path):
    model, tokenizer = _loaded(all_run, kind)
    samples, got = _harness_loglikelihoods(model, tokenizer, tmp_path / "repaired")
    requests = [ChoiceRequest(s["doc"]["context"], tuple(s["doc"]["choices"])) for s in samples]
    want = [list(s.logprob) for s in Evaluator(model, tokenizer, progress=False).score_choices(requests)]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    _, unrepaired = _harness_loglikelihoods(base, tokenizer, tmp_path / "base")
    assert np.abs(np.array(got) - np.array(unrepaired)).max() > 1e-3


def test_repair_evaluate_lm_eval_prints_and_writes_the_harness_results(all_run, tmp_path):
    out = tmp_path / "lm_eval.json"
    r = run_cli("evaluate", "--model", all_run / "checkpoints" / "stack", "--lm-eval", "repair_pairs", "--limit", "2",
                "--json", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())["results"]["repair_pairs"]
    model, tokenizer = _loaded(all_run, "stack")
    _, scores = _harness_loglikelihoods(model, tokenizer, tmp_path / "again", limit=2)
    assert result["acc,none"] == pytest.approx(np.mean([s[0] > s[1] for s in scores]))
    assert "repair_pairs" in r.stdout and "acc" in r.stdout
