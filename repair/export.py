"""Export a pruned checkpoint that plain `transformers` loads with no project code.

The chosen heads' slices of the attention output projection are zeroed in a fresh copy of the
weights (transformers 5 has no physical head pruning that survives a reload, see `repair.heads`).
The directory is written under a temporary name and renamed into place, so a crash never leaves a
half checkpoint under `checkpoint/`; the export is reloaded and compared with the masked model first.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from repair import failpoints
from repair.heads import HeadMasker, prune_checkpoint
from repair.io import UMASK
from repair.models import LoadedModel

CHECK_TEXT = "The nurse said that the doctor"


def export_pruned(loaded: LoadedModel, mask: np.ndarray, target: Path, manifest: dict, card: str) -> Path:
    model = copy.deepcopy(loaded.model).to("cpu", dtype=torch.float32)
    pruned = prune_checkpoint(model, mask)
    assert pruned == manifest["pruned_heads"], "manifest and mask disagree"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crash mid-export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        failpoints.reached("export")
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "repair_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        failpoints.reached("export")
        _check_reload(loaded, mask, tmp)
        failpoints.reached("export")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@torch.inference_mode()
def _check_reload(loaded: LoadedModel, mask: np.ndarray, folder: Path) -> None:
    """The exported weights, loaded by plain transformers, must give the masked model's logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([loaded.tokenizer(CHECK_TEXT).input_ids])
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = loaded.model
    with HeadMasker(model, torch.from_numpy(mask[None].astype(np.float32))):
        expected = model(ids.to(next(model.parameters()).device)).logits.float().cpu()
    got = reloaded(ids).logits
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.15  # bf16 on GPU vs float32 export
    if not torch.allclose(expected, got, atol=tol):
        raise RuntimeError(f"exported checkpoint differs from the masked model (max |diff| "
                           f"{(expected - got).abs().max():.3g}); not exported")


def model_card(manifest: dict) -> str:
    rep = manifest["metrics"]["report"]
    obj = manifest["objectives"]
    lines = [
        f"# Fairness-repaired {manifest['model']['spec']}",
        "",
        f"Made by fairness-repair (`{manifest['method']}`): {len(manifest['pruned_heads'])} attention heads",
        "pruned (their slices of the attention output projection are zero). Loads with plain",
        "`transformers.AutoModelForCausalLM.from_pretrained`, no custom code.",
        "",
        "| held-out report split | unrepaired | repaired |",
        "|---|---|---|",
        f"| fairness: {obj['fairness']['name']} ({obj['fairness']['better']} is better) | "
        f"{rep['base']['fairness']:.4f} | {rep['repaired']['fairness']:.4f} |",
        f"| utility: {obj['utility']['name']} ({obj['utility']['better']} is better) | "
        f"{rep['base']['utility']:.4f} | {rep['repaired']['utility']:.4f} |",
        "",
        "Every metric with its 95% bootstrap interval is in `repair_manifest.json`.",
        "",
        f"Command: `{' '.join(manifest['command'])}`",
        "",
    ]
    return "\n".join(lines)
