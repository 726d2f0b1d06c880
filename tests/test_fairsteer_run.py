"""`repair run --method fairsteer` end to end on a tiny random Llama, and its hooked checkpoint:
the layer sweep and the always-on sequence, the surrogates scoring every configuration, `repair.load`
re-attaching the steering, `repair generate` with setting flags, bad checkpoints refused."""
import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SMALL, rescore_as_a_worker, run_cli, small_run
from repair.cli import main
from repair.errors import UserError
from repair.methods.fairsteer.steerer import SteerSetting, Steerer
from repair.methods.fairsteer.steering import Steering

FAIRSTEER = ["--method", "fairsteer"]
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 7, 100, 3]])


@pytest.fixture(scope="module")
def fairsteer_run(model_dir, tmp_path_factory):
    return small_run(model_dir, tmp_path_factory, "fairsteer", *FAIRSTEER)


def _trials(run):
    study = optuna.load_study(study_name=f"repair-{run.name}", storage=f"sqlite:///{run / 'study.db'}")
    return [t for t in study.trials if t.state.name == "COMPLETE"]


@pytest.fixture(scope="module")
def hooked_checkpoint(fairsteer_run, model_dir, tmp_path_factory):
    """A hooked export of a setting that certainly changes the model (the run may choose the base)."""
    from repair.export import export_hooked, model_card
    from repair.models import ModelSpec, load_model

    steering = Steering.from_bytes((fairsteer_run / "fairsteer" / "steering.safetensors").read_bytes())
    setting = {"layer": 1, "alpha": 2.0, "threshold": None}
    manifest = json.loads((fairsteer_run / "checkpoint" / "repair_manifest.json").read_text())
    manifest.update(setting)
    loaded = load_model(ModelSpec(str(model_dir), device="cpu"))
    target = tmp_path_factory.mktemp("hooked") / "checkpoint"
    export_hooked(loaded, "fairsteer", steering.tensors(), {"setting": setting}, target, manifest, model_card(manifest))
    return target, steering, setting


def test_run_exports_a_hooked_checkpoint_with_its_manifest(fairsteer_run):
    ckpt = fairsteer_run / "checkpoint"
    manifest = json.loads((ckpt / "repair_manifest.json").read_text())
    assert manifest["method"] == "fairsteer" and (manifest["chosen_on"], manifest["reported_on"]) == ("select", "report")
    assert {"layer", "alpha", "threshold", "gated"} <= set(manifest)
    assert {"interventions.safetensors", "model.safetensors"} <= set(manifest["files_sha256"])
    assert "kl_neutral" in (ckpt / "README.md").read_text()
    record = json.loads((fairsteer_run / "fairsteer" / "steering.json").read_text())
    assert record["labels"] == "association" and len(record["scores"]) == 3  # one probe per layer
    assert "FairSteer probes" in (fairsteer_run / "report" / "index.html").read_text()


def test_gate_levels_are_quantiles_of_the_probes_scores_on_the_fitting_prompts(fairsteer_run):
    """A key's gate level resolves to the probe's P(biased) at that quantile, recomputed here from the
    stored probe and the search prompts' activations at the steered layer."""
    from repair.models import load_model, ModelSpec
    from repair.methods.fairmed.probers import collect
    from repair.methods.fairsteer.space import STEER_GATES
    from repair.methods.fairsteer.steering import Steering, residual_modules
    from repair.suites.association import AssociationSuite
    from repair.suites.base import EvalConfig

    steering = Steering.from_bytes((fairsteer_run / "fairsteer" / "steering.safetensors").read_bytes())
    assert steering.gates.shape == (3, len(STEER_GATES) - 1)
    assert (np.diff(steering.gates.numpy(), axis=1) >= 0).all()  # higher level, higher threshold
    config = json.loads((fairsteer_run / "config.json").read_text())["identity"]
    loaded = load_model(ModelSpec(model=config["model"]["model"]))
    prompts = [p.prompt for p in AssociationSuite(EvalConfig(split="search")).prompts]
    acts = collect(loaded.model, loaded.tokenizer, prompts, modules=residual_modules(loaded.model))
    layer = 1
    p = 1 / (1 + np.exp(-(acts[:, layer].astype(np.float64) @ steering.w[layer].double().numpy() + float(steering.b[layer]))))
    # the probe was fitted on the labelled prompts only: their scores lie within the whole set's range
    assert p.min() - 1e-4 <= float(steering.gates[layer, 0]) and float(steering.gates[layer, -1]) <= p.max() + 1e-4
    from repair.methods import artifacts
    from repair.methods.fairsteer.method import ARTIFACT, FairSteer
    from repair.rundir import RunConfig

    method = FairSteer(RunConfig(out=fairsteer_run), loaded.model)
    method.load_artifacts({f"artifact:{ARTIFACT}": artifacts.pack(steering.to_bytes())})  # as a worker does
    assert method.space.config(f"fairsteer:{layer}/alpha=0.3/gate=q0.75").threshold == pytest.approx(float(steering.gates[layer, 2]))


def test_layer_sweep_and_always_on_sequences(fairsteer_run):
    trials = _trials(fairsteer_run)
    sweep = sorted(t.user_attrs["key"] for t in trials if t.user_attrs["phase"] == "layer-sweep")
    assert sweep == [f"fairsteer:{l}/alpha=0.3/gate=q0.5" for l in range(3)]
    methods = json.loads((fairsteer_run / "methods.json").read_text())
    assert set(methods) == {"fairsteer", "layer-sweep", "always-on"}
    always = [t.user_attrs["key"] for t in trials if t.user_attrs["key"].endswith("/always")]
    assert methods["always-on"]["evaluations"] == 1 + len(always) and always  # the base model and each always-on one
    assert methods["layer-sweep"]["evaluations"] == 1 + 3


def test_each_round_evaluates_the_best_predicted_configurations_of_the_whole_grid(fairsteer_run):
    """No annealing for this space: recompute every configuration's prediction from the saved
    surrogates and check the round evaluated the top ones, in order."""
    from repair.methods.fairsteer.space import ALPHAS, STEER_GATES
    from surrogate import joint_predictor, load

    folder = fairsteer_run / "fairsteer" / "surrogates"
    fit = json.loads((folder / "fit-1.json").read_text())
    plan = json.loads((folder / "round-1.json").read_text())
    models = [load(folder / fit["files"][o], fit["sha256"][o], inside=fairsteer_run) for o in ("fairness", "utility")]
    keys, rows = [], []
    for layer in range(3):
        for a in ALPHAS:
            for t in STEER_GATES:
                bits = np.ones(3)
                bits[layer] = 0
                keys.append(f"fairsteer:{layer}/alpha={a:g}/" + ("always" if t is None else f"gate=q{t:g}"))
                rows.append([*bits, a, 0.0 if t is None else t, float(t is None)])
    fm, fs, um, us = joint_predictor(*models)(np.array(rows))
    trials = {t.user_attrs["key"]: t for t in _trials(fairsteer_run)}
    limit = np.log(trials["base"].user_attrs["utility"] * 1.05)  # log-perplexity of the unrepaired model + 5%
    before = set(fit["keys"])
    score = np.where(um + 0.5 * us <= limit, fm + 0.5 * fs, np.inf).astype(np.float32)
    order = [keys[i] for i in sorted(range(len(keys)), key=lambda i: (score[i], keys[i]))
             if keys[i] not in before and np.isfinite(score[i])]
    assert len(order) >= 4 and plan["candidates"] == order[:4]


def _in_memory(model_dir, steering, setting):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, Steerer(model, steering, [SteerSetting(**setting)])


def test_reloaded_checkpoint_equals_the_in_memory_repaired_model(hooked_checkpoint, model_dir):
    import repair

    target, steering, setting = hooked_checkpoint
    reloaded, _ = repair.load(target)
    model, _ = _in_memory(model_dir, steering, setting)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        got, want, plain = reloaded(IDS).logits, model(IDS).logits, base(IDS).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    # a gate that never fires (threshold 1: no probability exceeds it) gives the base model exactly
    never, _ = repair.load(target, setting={"threshold": 1.0})
    with torch.inference_mode():
        assert torch.equal(never(IDS).logits, plain)


def test_generation_with_kv_cache_equals_without(hooked_checkpoint):
    import repair

    model, _ = repair.load(hooked_checkpoint[0])
    with torch.inference_mode():
        cached = model.generate(IDS, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(IDS, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.tolist() == uncached.tolist()


def test_generate_takes_fairsteer_flags_and_refuses_fairmed_ones(hooked_checkpoint):
    target = hooked_checkpoint[0]
    r = run_cli("generate", "--model", target, "--prompt", "The nurse", "--max-new-tokens", "5",
                "--alpha", "0.5", "--threshold", "0.7", "--layers", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The nurse")
    r = run_cli("generate", "--model", target, "--prompt", "x", "--lam", "0.2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lam does not apply to a fairsteer checkpoint" in r.stderr
    r = run_cli("generate", "--model", target, "--prompt", "x", "--layers", "0,1")
    assert r.returncode == 2 and "FairSteer steers one layer" in r.stderr


def test_vectors_of_another_width_are_refused(hooked_checkpoint, tmp_path):
    """Hashes that match, shapes that do not: vectors for a wider model."""
    import repair
    from repair.io import sha256_file
    from safetensors.torch import save_file

    target, steering, setting = hooked_checkpoint
    bad = Path(shutil.copytree(target, tmp_path / "ckpt"))
    wide = Steering(torch.zeros(3, 2 * steering.width), steering.b, torch.zeros(3, 2 * steering.width), steering.scale)
    save_file(wide.tensors(), str(bad / "interventions.safetensors"),
              metadata={"method": "fairsteer", "setting": json.dumps(setting)})
    manifest = json.loads((bad / "repair_manifest.json").read_text())
    manifest["files_sha256"]["interventions.safetensors"] = sha256_file(bad / "interventions.safetensors")
    (bad / "repair_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not fit the model"):
        repair.load(bad)


def test_a_worker_scores_fairsteer_configurations_as_the_run_did(fairsteer_run):
    """What a `repair worker` builds from the study alone (the run's vectors included) gives the stored numbers."""
    done, rows = rescore_as_a_worker(fairsteer_run, "fairsteer")
    assert len(done) == 3
    for t, row in zip(done, rows):
        assert row["fairness"] == pytest.approx(t.values[0], rel=1e-6)
        assert row["utility_loss"] == pytest.approx(t.values[1], rel=1e-6)


def test_random_baseline_has_the_same_budget_and_stays_out_of_always_on(model_dir, tmp_path):
    out = tmp_path / "random"
    assert main(["run", "--model", str(model_dir), "--out", str(out), *SMALL, *FAIRSTEER, "--baselines", "random"]) == 0
    methods = json.loads((out / "methods.json").read_text())
    assert set(methods) == {"fairsteer", "layer-sweep", "always-on", "random"}
    assert methods["random"]["evaluations"] == 1 + 26  # the unrepaired model + the budget
    searched_always = [t.user_attrs["key"] for t in _trials(out)
                       if t.user_attrs["key"].endswith("/always") and t.user_attrs["phase"] != "random"]
    assert methods["always-on"]["evaluations"] == 1 + len(searched_always)
