"""A run's identity covers the numbers its records are computed with: the weights' fingerprint, the
device type and the resolved dtype. A resume or a worker with other ones is refused in one line."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from repair.errors import UserError
from repair.models import ModelSpec, check_transformers, model_numbers
from repair.rundir import RunConfig, prepare
from repair.worker import WorkerConfig, run_config_from_study
import repair.models as models
from tiny import tiny_checkpoint


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAIR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def other_model(tmp_path):
    return tiny_checkpoint(tmp_path / "other", seed=1)  # same architecture, other random weights


def config(out, model, **spec) -> RunConfig:
    return RunConfig(out=Path(out), model=ModelSpec(str(model), device="cpu", **spec))


def started(out, model, **spec) -> RunConfig:
    """A run directory as `repair run` leaves it once it has started."""
    c = config(out, model, **spec)
    assert prepare(c, {}) is False
    return c


def test_numbers_resolve_auto_and_follow_the_weights_not_the_path(model_dir, other_model, tmp_path):
    numbers = model_numbers(ModelSpec(str(model_dir), device="cpu"))
    assert numbers["device"] == "cpu" and numbers["dtype"] == "float32"  # auto, as it resolves on CPU
    assert model_numbers(ModelSpec(str(model_dir), device="cpu", dtype="bfloat16"))["dtype"] == "bfloat16"
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert model_numbers(ModelSpec(str(copy), device="cpu")) == numbers
    assert model_numbers(ModelSpec(str(other_model), device="cpu"))["fingerprint"] != numbers["fingerprint"]


def test_weight_hashes_are_cached_by_path_size_and_mtime(model_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    first = model_numbers(ModelSpec(str(copy), device="cpu"))
    assert model_numbers(ModelSpec(str(copy), device="cpu")) == first and len(calls) == 1
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, new mtime, other content
    weights.write_bytes(bytes(data))
    assert model_numbers(ModelSpec(str(copy), device="cpu"))["fingerprint"] != first["fingerprint"] and len(calls) == 2


def test_resume_with_another_dtype_is_refused_naming_it(model_dir, tmp_path):
    started(tmp_path / "run", model_dir)
    assert prepare(config(tmp_path / "run", model_dir, dtype="float32"), {}) is True  # auto is float32 on CPU
    with pytest.raises(UserError) as e:
        prepare(config(tmp_path / "run", model_dir, dtype="bfloat16"), {})
    message = str(e.value)
    assert "on cpu/float32; this process has" in message and "on cpu/bfloat16 (different dtype:" in message
    assert "\n" not in message


def test_resume_with_another_model_is_refused_naming_it(model_dir, other_model, tmp_path):
    started(tmp_path / "run", model_dir)
    with pytest.raises(UserError, match=r"\(different model weights: rerun with the same --model"):
        prepare(config(tmp_path / "run", other_model), {})


def test_weights_replaced_behind_the_same_path_are_refused(model_dir, other_model, tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    started(tmp_path / "run", model)
    shutil.copy(other_model / "model.safetensors", model / "model.safetensors")
    with pytest.raises(UserError, match="different model weights"):
        prepare(config(tmp_path / "run", model), {})


def test_run_directory_of_an_older_version_is_refused(model_dir, tmp_path):
    started(tmp_path / "run", model_dir)
    saved = tmp_path / "run" / "config.json"
    old = json.loads(saved.read_text())
    del old["identity"]["numbers"]
    saved.write_text(json.dumps(old))
    with pytest.raises(UserError, match="older fairness-repair that did not record the model's fingerprint"):
        prepare(config(tmp_path / "run", model_dir), {})


def published(c: RunConfig) -> SimpleNamespace:
    """A study as `repair.runloop.publish` leaves it, for `run_config_from_study`."""
    return SimpleNamespace(user_attrs={"run": {"identity": c.identity(), "data_dir": None, "heartbeat": 10,
                                               "data_sha256": []}})


def test_worker_joins_with_a_copy_of_the_model_and_takes_the_runs_dtype(model_dir, tmp_path):
    study = published(config(tmp_path / "run", model_dir, dtype="bfloat16"))
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    c = run_config_from_study(study, WorkerConfig("sqlite://", "s", model=str(copy), device="cpu"))
    assert c.model.model == str(copy) and c.model.dtype == "bfloat16"


def test_worker_with_another_model_is_refused_naming_it(model_dir, other_model, tmp_path):
    study = published(config(tmp_path / "run", model_dir))
    with pytest.raises(UserError) as e:
        run_config_from_study(study, WorkerConfig("sqlite://", "s", model=str(other_model), device="cpu"))
    assert str(e.value).startswith("study 's' holds a run of model fingerprint ")
    assert "(different model weights: point --model at a copy of the run's model, with --device cpu)" in str(e.value)


def test_worker_for_a_run_of_an_older_version_is_refused(model_dir, tmp_path):
    study = published(config(tmp_path / "run", model_dir))
    del study.user_attrs["run"]["identity"]["numbers"]
    with pytest.raises(UserError, match="older fairness-repair"):
        run_config_from_study(study, WorkerConfig("sqlite://", "s", device="cpu"))


def test_an_unset_flag_is_recorded_as_what_it_resolves_to(model_dir, tmp_path):
    """--expert-layers unset means 8 in this version: a run made when it meant 6 (its identity said so, or
    older ones said nothing) is neither resumed nor joined, and an explicit value records no default."""
    from dataclasses import replace
    from repair.methods.experts.options import DEFAULT_LAYERS, ExpertsOptions

    assert config(tmp_path / "x", model_dir).identity()["unset"] == {"expert_layers": DEFAULT_LAYERS} == {"expert_layers": 8}
    explicit = replace(config(tmp_path / "x", model_dir), options={"experts": ExpertsOptions(expert_layers=4)})
    assert explicit.identity()["unset"] == {} and explicit.identity()["expert_layers"] == 4
    started(tmp_path / "run", model_dir)
    saved = tmp_path / "run" / "config.json"
    old = json.loads(saved.read_text())
    old["identity"]["unset"] = {"expert_layers": 6}
    saved.write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"made when unset flags meant \{'expert_layers': 6\}; this version means "):
        prepare(config(tmp_path / "run", model_dir), {})
    study = published(config(tmp_path / "run", model_dir))
    study.user_attrs["run"]["identity"]["unset"] = {"expert_layers": 6}
    with pytest.raises(UserError, match=r"made when unset flags meant \{'expert_layers': 6\}; this version .* means "
                                        r"\{'expert_layers': 8\}"):
        run_config_from_study(study, WorkerConfig("sqlite://", "s", device="cpu"))


def test_hub_model_is_fingerprinted_from_its_files_like_a_local_copy(model_dir, tmp_path, monkeypatch):
    """A hub id's weights are fetched (here: found in an offline cache) before loading and hashed, so a
    worker may use a local copy of a hub model the coordinator named by id."""
    from huggingface_hub import constants

    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_numbers(ModelSpec("org/tiny", device="cpu")) == model_numbers(ModelSpec(str(model_dir), device="cpu"))
    with pytest.raises(UserError, match="could not find the weights of model 'org/absent'"):
        model_numbers(ModelSpec("org/absent", device="cpu"))


@pytest.mark.parametrize("found, ok", [("5.20.2", False), ("4.57.6", False), ("3.5.1", False),
                                       ("5.21.0", True), ("5.22.0.dev0", True), ("6.0.0", True)])
def test_transformers_version_check(found, ok):
    if ok:
        check_transformers(found)
    else:
        with pytest.raises(UserError, match=rf"transformers {found} is installed but fairness-repair needs "
                                            rf"transformers >= 5\.21 \(pip install -U 'transformers>=5\.21'\)"):
            check_transformers(found)


def test_too_old_transformers_stops_model_loading_in_one_line(model_dir, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.40.0" if name == "transformers" else "1")
    with pytest.raises(UserError, match="transformers 4.40.0 is installed"):
        models.load_model(ModelSpec(str(model_dir), device="cpu"))
