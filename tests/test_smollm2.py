"""Integration on the real embedded model (SmolLM2-135M-Instruct): a few items of every suite."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from repair.evaluator import Evaluator, ReferenceScorer
from repair.models import ModelSpec, embedded_gguf, load_model
from repair.suites.base import EvalConfig
from repair.suites.bbq import BBQSuite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec("smollm2-135m", device="cpu"))


def test_embedded_model_shape(smollm2):
    info = smollm2.describe()
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"]) == (30, 9, 3)
    assert "quantization_config" not in smollm2.model.config.to_dict()


def test_cached_checkpoint_equals_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([smollm2.tokenizer("The nurse said that").input_ids])
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, smollm2.model(ids).logits)


def test_fast_matches_reference_on_bbq(smollm2, shared_data):
    for mode in ("cloze", "choice"):
        suite = BBQSuite(EvalConfig(data_dir=shared_data, limit=4, categories=("Gender_identity",), bbq_mode=mode),
                         smollm2.tokenizer)
        reqs = suite.requests()
        fast = Evaluator(smollm2.model, smollm2.tokenizer, progress=False).score_choices(reqs)
        ref = ReferenceScorer(smollm2.model, smollm2.tokenizer, progress=False).score_choices(reqs)
        for f, r in zip(fast, ref):
            np.testing.assert_allclose(f.logprob, r.logprob, atol=1e-4)


def test_evaluate_every_suite(tmp_path, shared_data):
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--model", "smollm2-135m", "--suite", "association,text,bbq,wikitext,mmlu",
                     "--data-dir", shared_data, "--limit", "4", "--categories", "Religion,Gender_identity", "--attributes", "religion,gender",
                     "--mmlu-subjects", "astronomy", "--mmlu-shots", "1", "--ppl-tokens", "256",
                     "--no-progress", "--json", out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    suites = report["suites"]
    assert set(suites) == {"association", "text", "bbq", "wikitext", "mmlu"}
    assert report["model"]["n_layers"] == 30
    # every data file used is listed with its sha256
    assert any(p.endswith("Religion.jsonl") for p in report["files"]) and all(len(h) == 64 for h in report["files"].values())
    # BBQ: s_DIS recomputed from the item records alone equals the reported metric
    items = suites["bbq"]["records"]
    dis = [r for r in items if r["context_condition"] == "disambig" and r["biased_index"] is not None
           and r["pred_index"] != r["unknown_index"]]
    if dis:
        biased = sum(r["pred_index"] == r["biased_index"] for r in dis)
        assert suites["bbq"]["metrics"]["overall/s_dis"]["value"] == pytest.approx(2 * biased / len(dis) - 1)
    # association: distributions are distributions; KL is non-negative
    for r in suites["association"]["records"]:
        assert sum(r["probs"]) == pytest.approx(1.0) and r["kl_uniform"] >= 0
    # perplexity of a 135M instruct model on English prose: plausible, finite
    assert 3 < suites["text"]["metrics"]["overall/perplexity"]["value"] < 200
    assert 3 < suites["wikitext"]["metrics"]["overall/perplexity"]["value"] < 200
    acc = suites["mmlu"]["metrics"]["overall/accuracy"]
    assert 0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 1
    assert "overall/s_amb" in result.stdout  # the readable table
