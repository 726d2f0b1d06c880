"""The run's probe pass kept in the run folder: one file for every site with its sha256, read back by
a resumed run (checked) instead of measured again; a changed file or another run's pass refused in one
line; FairMed's probers and FairSteer's steering name the pass they were fitted on, are reused while it
stands and refitted when it has been replaced."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from repair.errors import UserError
from repair.io import sha256_file, write_json_atomic
from repair.methods import probe_pass
from repair.methods.fairmed import probers as P
from repair.methods.fairmed.cache import probe
from repair.methods.fairsteer import steering as S
from repair.methods.probe_pass import ProbePass
from repair.models import LoadedModel, ModelSpec
from repair.suites.base import EvalConfig
from tiny import ByteTokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = EvalConfig(split="search", attributes=("gender", "religion"))
QUICK = dict(dims=8, l2_grid=(0.1, 1.0), folds=2)


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel(tiny_llama(), ByteTokenizer(add_bos=True), ModelSpec("tiny"), "tiny", None)


def sites(loaded):
    return {"mlp": P.mlp_modules(loaded.model), "residual": S.residual_modules(loaded.model)}


def refuse(*args, **kwargs):
    raise AssertionError("measured or fitted again")


@pytest.fixture(scope="module")
def kept(loaded, tmp_path_factory):
    """A pass measured into a folder, and what it handed out: (folder, {site: ProbeData})."""
    folder = tmp_path_factory.mktemp("run")
    measured = ProbePass(loaded, CONFIG, sites(loaded), folder)
    return folder, {s: measured.data(s) for s in ("mlp", "residual")}


def _same(a, b):
    np.testing.assert_array_equal(a.activations, b.activations)
    assert a.attributes == b.attributes and a.concepts == b.concepts and a.stereotyped == b.stereotyped
    assert a.groups == b.groups and np.array_equal(a.neutral, b.neutral)
    assert all(np.array_equal(x, y) for x, y in zip(a.distributions, b.distributions))


def test_the_pass_is_one_file_with_its_sha256_read_back_as_measured(kept, loaded, monkeypatch):
    folder, first = kept
    assert sorted(p.name for p in folder.iterdir()) == ["probe-pass.json", "probe-pass.npz"]
    record = json.loads((folder / "probe-pass.json").read_text())
    assert record["sha256"] == sha256_file(folder / "probe-pass.npz")
    assert record["key"]["sites"] == {"mlp": 3, "residual": 3} and record["key"]["split"] == "search"
    # what was handed out is each site's own pass (an independent measurement), labels included
    _same(first["residual"], P.probe_data(loaded, CONFIG, progress=False, modules=S.residual_modules(loaded.model)))
    assert any(first["mlp"].stereotyped)
    monkeypatch.setattr(P, "probe_data_at", refuse)  # a resumed run reads the file, never the model
    again = ProbePass(loaded, CONFIG, sites(loaded), folder)
    assert again.recorded() == again.sha256() == record["sha256"]
    for site, data in first.items():
        _same(again.data(site), data)


def test_a_changed_file_or_another_runs_pass_is_refused_in_one_line(kept, loaded, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(kept[0], folder)
    with pytest.raises(UserError, match=r"holds activations of another sites than this run's; delete it and probe-pass"):
        ProbePass(loaded, CONFIG, {"mlp": P.mlp_modules(loaded.model)}, folder).data("mlp")
    with pytest.raises(UserError, match=r"another attributes than this run's"):
        ProbePass(loaded, replace(CONFIG, attributes=("gender",)), sites(loaded), folder).sha256()
    path = folder / "probe-pass.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"probe-pass.npz is not the file that was measured .* delete both"):
        ProbePass(loaded, CONFIG, sites(loaded), folder).data("mlp")


def _replaced(folder, pass_, scale):
    """The folder's pass replaced by another one, every activation times `scale` (its record rewritten)."""
    data = {s: replace(d, activations=d.activations * scale) for s, d in
            ((s, ProbePass(pass_.loaded, pass_.eval_config, pass_.sites, folder).data(s)) for s in pass_.sites)}
    probe_pass.save(folder / probe_pass.FILE, data)
    write_json_atomic(folder / probe_pass.RECORD, {"sha256": sha256_file(folder / probe_pass.FILE), "key": pass_.key()})
    return sha256_file(folder / probe_pass.FILE), data


def test_fairmed_probers_name_the_pass_and_are_refitted_only_when_it_is_replaced(kept, loaded, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(kept[0], run)
    pass_ = ProbePass(loaded, CONFIG, sites(loaded), run)
    probers, _ = probe(loaded, CONFIG, run / "fairmed", fit_settings=QUICK, source=pass_.site("mlp"))
    assert sorted(p.name for p in (run / "fairmed").iterdir()) == ["probe-scores.json", "probers.safetensors"]
    record = json.loads((run / "fairmed" / "probe-scores.json").read_text())
    assert record["activations_sha256"] == sha256_file(run / "probe-pass.npz")
    alone, _ = P.fit(kept[1]["mlp"], **QUICK)  # the same fit on the data the pass handed out
    assert torch.equal(probers.A, alone.A) and torch.equal(probers.gate_kl, alone.gate_kl)

    with monkeypatch.context() as m:  # resumed: reused, nothing measured, read or fitted
        m.setattr(P, "probe_data_at", refuse)
        m.setattr(P, "fit", refuse)
        m.setattr(ProbePass, "data", refuse)
        again, _ = probe(loaded, CONFIG, run / "fairmed", fit_settings=QUICK,
                         source=ProbePass(loaded, CONFIG, sites(loaded), run).site("mlp"))
    assert torch.equal(again.A, probers.A)

    new_sha, doubled = _replaced(run, pass_, 2.0)
    refit, _ = probe(loaded, CONFIG, run / "fairmed", fit_settings=QUICK,
                     source=ProbePass(loaded, CONFIG, sites(loaded), run).site("mlp"))
    assert torch.equal(refit.A, P.fit(doubled["mlp"], **QUICK)[0].A) and not torch.allclose(refit.A, probers.A)
    assert json.loads((run / "fairmed" / "probe-scores.json").read_text())["activations_sha256"] == new_sha


def test_fairsteer_steering_names_the_pass_and_is_refitted_only_when_it_is_replaced(kept, loaded, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(kept[0], run)
    pass_ = ProbePass(loaded, CONFIG, sites(loaded), run)  # margin 0: a random model's prompts fall on both sides
    steering, _ = S.prepare(loaded, CONFIG, run / "fairsteer", margin=0.0, progress=False, source=pass_.site("residual"))
    record = json.loads((run / "fairsteer" / "steering.json").read_text())
    assert record["activations_sha256"] == sha256_file(run / "probe-pass.npz")

    with monkeypatch.context() as m:
        m.setattr(P, "probe_data_at", refuse)
        m.setattr(S, "fit", refuse)
        m.setattr(ProbePass, "data", refuse)
        again, _ = S.prepare(loaded, CONFIG, run / "fairsteer", margin=0.0, progress=False,
                             source=ProbePass(loaded, CONFIG, sites(loaded), run).site("residual"))
    assert torch.equal(again.direction, steering.direction)

    new_sha, doubled = _replaced(run, pass_, 2.0)
    refit, _ = S.prepare(loaded, CONFIG, run / "fairsteer", margin=0.0, progress=False,
                         source=ProbePass(loaded, CONFIG, sites(loaded), run).site("residual"))
    assert json.loads((run / "fairsteer" / "steering.json").read_text())["activations_sha256"] == new_sha
    acts, label, concepts, excess = S.association_examples(loaded, CONFIG, 0.0, data=doubled["residual"])
    alone, _ = S.fit(acts, label, concepts, excess=excess, extremes=S.VECTOR_EXTREMES)
    assert torch.equal(refit.w, alone.w) and not torch.allclose(refit.w, steering.w)
