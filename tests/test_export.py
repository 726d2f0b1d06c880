"""Export: the model's own tensors plus zeroed copies of the pruned projections (no full copy), in the
loaded dtype, checked on reload relative to the logits' scale, and safe against a kill between renames."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import repair.export
import repair.methods.prune.checkpoint as export
from conftest import ROOT
from repair.methods.prune.heads import attention_output, decoder_layers
from repair.models import ModelSpec, load_model

MASK = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])  # the tiny models' 3 layers x 4 heads
PRUNED = [[0, 1], [2, 0], [2, 3]]


def manifest():
    return {"pruned_heads": PRUNED}


def masked_logits(model, ids):
    from repair.methods.prune.heads import HeadMasker

    with torch.inference_mode(), HeadMasker(model, torch.from_numpy(MASK[None].astype(np.float32))):
        return model(ids).logits.float()


def saved(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def loaded(model_dir):
    return load_model(ModelSpec(str(model_dir), device="cpu"))


def test_state_dict_is_the_models_own_tensors_but_for_the_zeroed_projections(loaded):
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, pruned = export.pruned_state_dict(model, MASK)
    assert pruned == PRUNED
    own = model.state_dict()
    copied = {k for k in state if state[k].data_ptr() != own[k].data_ptr()}
    assert copied == {"model.layers.0.self_attn.o_proj.weight", "model.layers.2.self_attn.o_proj.weight"}
    w = state["model.layers.2.self_attn.o_proj.weight"]
    assert (w[:, 0:16] == 0).all() and (w[:, 48:64] == 0).all() and (w[:, 16:48] != 0).any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_export_keeps_the_loaded_dtype_and_reloads_to_the_masked_logits(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    for dtype in ("float32", "bfloat16"):
        loaded = load_model(ModelSpec(str(model_dir), device="cpu", dtype=dtype))
        target = export.export_pruned(loaded, MASK, tmp_path / dtype / "checkpoint", manifest(), "card\n")
        weights = saved(target)
        assert {str(t.dtype) for t in weights.values()} == {f"torch.{dtype}"}
        assert json.loads((target / "config.json").read_text())["dtype"] == dtype
        assert (weights["model.layers.0.self_attn.o_proj.weight"][:, 16:32] == 0).all()
        ids = torch.tensor([loaded.tokenizer("The doctor and the nurse").input_ids])
        reloaded = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
        with torch.inference_mode():
            assert torch.equal(reloaded(ids).logits.float(), masked_logits(loaded.model, ids))  # same CPU kernels


def test_exported_files_have_the_users_umask_permissions(loaded, tmp_path):
    import stat

    from repair.io import UMASK

    target = export.export_pruned(loaded, MASK, tmp_path / "checkpoint", manifest(), "card\n")
    assert {stat.S_IMODE(f.stat().st_mode) for f in target.iterdir()} == {0o666 & ~UMASK}
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~UMASK


def test_export_in_another_dtype_when_asked(loaded, tmp_path):
    target = export.export_pruned(loaded, MASK, tmp_path / "checkpoint", manifest(), "card\n", dtype=torch.bfloat16)
    assert {t.dtype for t in saved(target).values()} == {torch.bfloat16}
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_gpt2_conv1d_rows_are_zeroed(tmp_path):
    from tiny import tiny_checkpoint, tiny_gpt2

    loaded = load_model(ModelSpec(str(tiny_checkpoint(tmp_path / "gpt2", make=tiny_gpt2)), device="cpu"))
    target = export.export_pruned(loaded, MASK, tmp_path / "checkpoint", manifest(), "card\n")
    w = saved(target)["transformer.h.2.attn.c_proj.weight"]  # Conv1D: [in, out]
    assert (w[0:16] == 0).all() and (w[48:64] == 0).all() and (w[16:48] != 0).any()


def test_reload_check_refuses_a_checkpoint_that_is_not_the_repaired_model(loaded, tmp_path, monkeypatch):
    """Negative control: the heads not zeroed (pruning 3 of 12 heads of a random model) fails the
    relative tolerance, and nothing is left under the target or as a temporary folder."""
    monkeypatch.setattr(export, "pruned_state_dict", lambda model, mask: (model.state_dict(), PRUNED))
    with pytest.raises(RuntimeError, match="exported checkpoint differs from the repaired model"):
        export.export_pruned(loaded, MASK, tmp_path / "checkpoint", manifest(), "card\n")
    assert list(tmp_path.iterdir()) == []


KILLED_EXPORT = """
import sys
from pathlib import Path
import numpy as np
from repair.methods.prune.checkpoint import export_pruned
from repair.models import ModelSpec, load_model
loaded = load_model(ModelSpec(sys.argv[1], device="cpu"))
mask = np.array({mask})
for _ in range(2):  # the second export replaces the first: target -> aside, then the new one in place
    export_pruned(loaded, mask, Path(sys.argv[2]), {{"pruned_heads": {pruned}}}, "card")
"""


def test_kill_between_the_renames_leaves_nothing_stale_after_the_next_export(model_dir, loaded, tmp_path):
    target = tmp_path / "checkpoint"
    # export points: 3 in the first export; in the second 3, then one after the old checkpoint was moved aside
    script = KILLED_EXPORT.format(mask=MASK.tolist(), pruned=PRUNED)
    proc = subprocess.run([sys.executable, "-c", script, str(model_dir), str(target)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "REPAIR_KILL_AT": "export:7"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[0] == ".checkpoint.old" and left[1].startswith(".checkpoint.tmp-") and len(left) == 2  # no checkpoint/
    export.export_pruned(loaded, MASK, target, manifest(), "card\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_checkpoint_only_aside_is_put_back_when_the_export_fails(loaded, tmp_path, monkeypatch):
    first = export.export_pruned(loaded, MASK, tmp_path / "checkpoint", manifest(), "card\n")
    first.rename(tmp_path / ".checkpoint.old")  # as a kill between the renames leaves it
    monkeypatch.setattr(repair.export, "_check_reload", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export.export_pruned(loaded, MASK, tmp_path / "checkpoint", manifest(), "card\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
