"""`repair.load(path)`: a checkpoint this tool exported, back as (model, tokenizer), repaired.

A pruned checkpoint is plain weights (its heads' slices are zero) and loads as it is; a hooked one
(FairMed, ...) is the base weights, `interventions.safetensors` and `repair_manifest.json`, and its
intervention is re-attached here. Every file is checked against the manifest's sha256 first, and
an intervention that does not fit the model's shapes is refused, in one line each.

    model, tokenizer = repair.load("runs/default/checkpoint")
    model.generate(**tokenizer("The nurse said", return_tensors="pt"), max_new_tokens=20)
    model.repair_interventions[0].remove()   # back to the base model
"""
from __future__ import annotations

import json
from pathlib import Path

from repair.errors import UserError

MANIFEST = "repair_manifest.json"
INTERVENTIONS = "interventions.safetensors"


def attach(model, method: str, tensors: dict, meta: dict):
    """Attach the intervention `method` exported (its tensors and settings) to `model`; ValueError
    when it does not fit the model."""
    if method == "fairmed":
        from repair.methods.fairmed import attach as attach_fairmed

        return attach_fairmed(model, tensors, {k: json.loads(v) if isinstance(v, str) else v for k, v in meta.items()})
    raise ValueError(f"unknown intervention method {method!r}")


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        what = "does not exist" if not path.exists() else ("is a file" if path.is_file() else f"holds no {MANIFEST}")
        raise UserError(f"{path} {what}: not a checkpoint exported by fairness-repair (give RUN_DIR/checkpoint)")
    try:
        return json.loads((path / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / MANIFEST} is not valid JSON ({exc}); re-export the checkpoint") from None


def check_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists has its recorded sha256 (checkpoints from before the hashes were
    recorded list none)."""
    from repair.io import sha256_file

    for name, digest in (manifest.get("files_sha256") or {}).items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{f} is missing (the manifest lists it): the checkpoint is incomplete; re-export it")
        if sha256_file(f) != digest:
            raise UserError(f"{f} does not match the sha256 in {MANIFEST}: it was changed or damaged after export "
                            "(re-export the checkpoint)")


def load(path, *, device: str = "cpu", dtype: str = "auto", verify: bool = True):
    """(model, tokenizer) with the checkpoint's repair in place, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        check_files(path, manifest)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.repair_interventions = []
    if (path / INTERVENTIONS).is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path / INTERVENTIONS), "pt") as f:
            meta = dict(f.metadata() or {})
        method = meta.pop("method", manifest.get("method"))
        try:
            hook = attach(model, method, load_file(str(path / INTERVENTIONS)), meta)
        except (ValueError, KeyError) as exc:
            raise UserError(f"{path / INTERVENTIONS} does not fit the model in {path}: {exc} "
                            "(the interventions were exported for another base model; re-export the checkpoint)") from None
        model.repair_interventions.append(hook)
    return model, tokenizer
