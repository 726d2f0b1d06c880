"""`repair run --method fairmed` end to end on a tiny random Llama, and its hooked checkpoint:
`repair.load` re-attaches the neutralizer, `repair generate` uses it, bad checkpoints are refused."""
import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import rescore_as_a_worker, run_cli, small_run
from repair.errors import UserError
from repair.methods.fairmed.neutralizer import Neutralizer, NeutralizerSetting
from repair.methods.fairmed.probers import Probers

FAIRMED = ["--method", "fairmed", "--max-layers", "3"]
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 7, 100, 3]])


@pytest.fixture(scope="module")
def fairmed_run(model_dir, tmp_path_factory):
    return small_run(model_dir, tmp_path_factory, "fairmed", *FAIRMED)


@pytest.fixture(scope="module")
def hooked_checkpoint(fairmed_run, model_dir, tmp_path_factory):
    """A hooked export of a setting that certainly changes the model (the run may choose the base)."""
    from repair.export import export_hooked, model_card
    from repair.models import ModelSpec, load_model

    probers = Probers.load(fairmed_run / "fairmed" / "probers.safetensors")
    setting = {"layers": [0, 2], "lam": 0.5, "steps": 3, "gate": 0.0, "target": "neutral"}
    manifest = json.loads((fairmed_run / "checkpoint" / "repair_manifest.json").read_text())
    manifest.update({"layers": setting["layers"], "lambda": 0.5, "steps": 3, "gate": 0.0, "target": "neutral"})
    loaded = load_model(ModelSpec(str(model_dir), device="cpu"))
    target = tmp_path_factory.mktemp("hooked") / "checkpoint"
    export_hooked(loaded, "fairmed", probers.tensors(), {"probers": probers.metadata(), "setting": setting}, target,
                  manifest, model_card(manifest))
    return target, probers, setting


def _in_memory(model_dir, probers, setting):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hook = Neutralizer(model, probers, [NeutralizerSetting(tuple(setting["layers"]), setting["lam"], setting["steps"],
                                                           setting["gate"], setting["target"])])
    return model, hook


def test_run_exports_a_hooked_checkpoint_with_its_manifest(fairmed_run):
    ckpt = fairmed_run / "checkpoint"
    manifest = json.loads((ckpt / "repair_manifest.json").read_text())
    assert manifest["method"] == "fairmed" and (manifest["chosen_on"], manifest["reported_on"]) == ("select", "report")
    assert {"layers", "lambda", "steps", "gate", "target"} <= set(manifest) and manifest["target"] == "neutral"
    assert len(manifest["layers"]) <= 3
    assert {"interventions.safetensors", "model.safetensors"} <= set(manifest["files_sha256"])
    for split in ("select", "report"):
        assert {"base", "repaired"} == set(manifest["metrics"][split])
    assert "kl_neutral" in (ckpt / "README.md").read_text()


def test_top_k_rule_is_evaluated_in_the_probers_order_and_verified(fairmed_run):
    scores = json.loads((fairmed_run / "fairmed" / "probe-scores.json").read_text())["scores"]
    gain = {}
    for s in scores:  # independent ranking: mean over attributes of macro-F1 above the majority baseline
        gain.setdefault(s["layer"], []).append((s["macro_f1"] - s["majority_f1"], s["kl_mean"] - s["kl"]))
    order = sorted(gain, key=lambda l: (-np.mean([g[0] for g in gain[l]]), -np.mean([g[1] for g in gain[l]]), l))
    methods = json.loads((fairmed_run / "methods.json").read_text())
    assert set(methods) == {"fairmed", "top-k"}
    study = optuna.load_study(study_name=f"repair-{fairmed_run.name}", storage=f"sqlite:///{fairmed_run / 'study.db'}")
    topk = [t.user_attrs["key"] for t in study.trials if t.user_attrs.get("phase") == "topk"]
    assert f"fairmed:{order[0]}/lam=0.1/steps=3/gate=0/target=neutral" in topk
    assert f"fairmed:{','.join(map(str, sorted(order[:2])))}/lam=0.1/steps=3/gate=0/target=neutral" in topk
    candidates = [json.loads(l) for l in (fairmed_run / "candidates.jsonl").read_text().splitlines()]
    assert any("top-k" in c["methods"] for c in candidates)  # its finalists are verified on the select split


def test_reloaded_checkpoint_equals_the_in_memory_repaired_model(hooked_checkpoint, model_dir):
    import repair

    target, probers, setting = hooked_checkpoint
    reloaded, tokenizer = repair.load(target)
    model, hook = _in_memory(model_dir, probers, setting)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        got, want, plain = reloaded(IDS).logits, model(IDS).logits, base(IDS).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the repair does change the model
    plain_load = AutoModelForCausalLM.from_pretrained(target).eval()  # plain transformers: the base weights
    with torch.inference_mode():
        assert torch.equal(plain_load(IDS).logits, plain)
    reloaded.repair_interventions[0].remove()
    with torch.inference_mode():
        assert torch.equal(reloaded(IDS).logits, plain)


def test_generation_with_kv_cache_equals_without(hooked_checkpoint):
    import repair

    model, _ = repair.load(hooked_checkpoint[0])
    with torch.inference_mode():
        cached = model.generate(IDS, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(IDS, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.tolist() == uncached.tolist()


def test_generate_command_prints_a_continuation(hooked_checkpoint):
    target = hooked_checkpoint[0]
    (target.parent / "plain").mkdir(exist_ok=True)
    r = run_cli("generate", "--model", target, "--prompt", "The nurse", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The nurse")
    r = run_cli("generate", "--model", target.parent / "plain", "--prompt", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a checkpoint exported by fairness-repair" in r.stderr


def test_altered_interventions_are_refused(hooked_checkpoint, tmp_path):
    import repair

    bad = Path(shutil.copytree(hooked_checkpoint[0], tmp_path / "ckpt"))
    data = bytearray((bad / "interventions.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "interventions.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the sha256"):
        repair.load(bad)


def test_interventions_for_another_model_are_refused(hooked_checkpoint, tmp_path):
    """Hashes that match, shapes that do not: probers for a wider model."""
    import repair
    from repair.io import sha256_file
    from safetensors.torch import save_file

    target, probers, setting = hooked_checkpoint
    bad = Path(shutil.copytree(target, tmp_path / "ckpt"))
    wide = Probers(torch.zeros(probers.A.shape[0], probers.A.shape[1], 2 * probers.width), probers.c, probers.sizes,
                   probers.attributes, probers.targets, probers.gate_kl)
    meta = {"method": "fairmed", "probers": json.dumps(probers.metadata()), "setting": json.dumps(setting)}
    save_file(wide.tensors(), str(bad / "interventions.safetensors"), metadata=meta)
    manifest = json.loads((bad / "repair_manifest.json").read_text())
    manifest["files_sha256"]["interventions.safetensors"] = sha256_file(bad / "interventions.safetensors")
    (bad / "repair_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not fit the model"):
        repair.load(bad)


def test_a_worker_scores_fairmed_configurations_as_the_run_did(fairmed_run):
    """What a `repair worker` builds from the study alone (the run's probers included) gives the stored numbers."""
    done, rows = rescore_as_a_worker(fairmed_run, "fairmed")
    assert len(done) == 3
    for t, row in zip(done, rows):
        assert row["fairness"] == pytest.approx(t.values[0], rel=1e-6)
        assert row["utility_loss"] == pytest.approx(t.values[1], rel=1e-6)
