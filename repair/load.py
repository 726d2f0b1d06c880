"""`repair.load(path)`: a checkpoint this tool exported, back as (model, tokenizer), repaired.

A pruned checkpoint is plain weights (its heads' slices are zero) and loads as it is; a hooked one
(FairMed, FairSteer) is the base weights, `interventions.safetensors` and `repair_manifest.json`, and
its intervention is re-attached here; an experts bundle also holds the two experts (`expert/`,
`anti_expert/`), and the model's forward applies their shift; a stack (repair.stacks) is all of
its parts at once, pruned weights included. Every file is checked against the manifest's sha256 first, and
an intervention that does not fit the model's shapes is refused, in one line each.

    model, tokenizer = repair.load("runs/default/checkpoint")
    model(**tokenizer("The nurse said", return_tensors="pt")).logits   # repaired, for every kind
    model.generate(**tokenizer("The nurse said", return_tensors="pt"), max_new_tokens=20)
    model.repair_interventions[0].remove()   # back to the base model
"""
from __future__ import annotations

import json
from pathlib import Path

from repair.applied import Applied
from repair.errors import UserError
from repair.methods import METHODS
from repair.space import STACK

MANIFEST = "repair_manifest.json"
INTERVENTIONS = "interventions.safetensors"


def attach(model, method: str, tensors: dict, meta: dict, folder: Path | None = None):
    """Attach the intervention `method` exported (its tensors and settings; `folder`, the checkpoint,
    for what it keeps beside them) to `model`; ValueError when it does not fit the model."""
    if method == STACK:  # several methods' interventions, each under its own prefix (repair.stacks)
        return attach_saved_stack(model, tensors, meta, folder)
    if method not in METHODS or METHODS[method].changes_weights:
        raise ValueError(f"unknown intervention method {method!r}")
    meta = {k: json.loads(v) if isinstance(v, str) else v for k, v in meta.items()}
    return METHODS[method].reattach(model, tensors, meta, folder)


def attach_saved_stack(model, tensors: dict, meta: dict, folder) -> Applied:
    """Re-attach an exported stack's hooked parts, each from the tensors and settings under its prefix."""
    hooks = []
    try:
        for name in json.loads(meta["parts"]) if isinstance(meta["parts"], str) else meta["parts"]:
            prefix = f"{name}/"
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            settings = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
            hooks.append(attach(model, name, own, settings, folder))
    except BaseException:
        Applied(model, hooks).remove()
        raise
    return Applied(model, hooks)


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


SETTING_FLAGS = "--layers/--lam/--steps/--gate/--alpha/--threshold"  # which of them a method takes: its setting_flags


def parse_setting(layers: str | None = None, lam: float | None = None, steps: int | None = None,
                  gate: float | None = None, alpha: float | None = None, threshold: str | None = None) -> dict:
    """Flags that replace parts of a hooked checkpoint's setting (`--layers 3,7 --lam 0.2 ...`),
    checked for form before any model is loaded (the method checks the values against its checkpoint:
    `merge_setting`); {} when none is given. `threshold` 'always' turns a gate off."""
    out = {}
    if layers is not None:
        try:
            out["layers"] = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--layers {layers!r}: give comma-separated layer indices such as 3,7,12") from None
        if not out["layers"]:
            raise UserError("--layers is empty (give comma-separated layer indices such as 3,7,12)")
    if lam is not None:
        if not lam >= 0:
            raise UserError(f"--lam must be 0 or more (a fraction of the activation's norm), got {lam}")
        out["lam"] = lam
    if steps is not None:
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        out["steps"] = steps
    if gate is not None:
        out["gate"] = gate
    if alpha is not None:
        if not alpha >= 0:
            raise UserError(f"--alpha must be 0 or more (the strength of FairSteer's vector or of the experts' shift), "
                            f"got {alpha}")
        out["alpha"] = alpha
    if threshold is not None:
        if threshold == "always":
            out["threshold"] = None
        else:
            try:
                value = float(threshold)
            except ValueError:
                value = None
            if value is None or not 0 <= value <= 1:
                raise UserError(f"--threshold must be a probability in [0, 1] or 'always', got {threshold!r}")
            out["threshold"] = value
    return out


def attach_saved(model, path, setting: dict | None = None, *, verify: bool = True):
    """Attach the intervention a checkpoint folder holds to `model` (its base weights, loaded by the
    caller); `setting` (parse_setting's) replaces parts of its setting. None for a checkpoint without
    one (a pruned checkpoint: its repair is in the weights)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        check_files(path, manifest)
    if not (path / INTERVENTIONS).is_file():
        if setting:
            raise UserError(f"{SETTING_FLAGS} change a hooked checkpoint's setting, but {path} holds a "
                            f"{manifest.get('method', 'pruned')} checkpoint (export one with repair run --method fairmed, "
                            "fairsteer or experts)")
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path / INTERVENTIONS), "pt") as f:
        meta = dict(f.metadata() or {})
    method = meta.pop("method", manifest.get("method"))
    if setting and method == STACK:
        raise UserError(f"{SETTING_FLAGS} change one method's setting; {path} holds a stack of "
                        f"{', '.join(json.loads(meta['parts']))} (export its parts with repair run --export-all to tune them)")
    if setting:
        meta["setting"] = json.dumps(_merged_setting(model, method, json.loads(meta["setting"]), setting))
    try:
        return attach(model, method, load_file(str(path / INTERVENTIONS)), meta, path)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"{path / INTERVENTIONS} does not fit the model in {path}: {exc} "
                        "(the interventions were exported for another base model; re-export the checkpoint)") from None


def _merged_setting(model, method: str, saved: dict, setting: dict) -> dict:
    """A checkpoint's saved setting with the flags' values in place, checked by its method against the model."""
    from repair import arch

    allowed = METHODS[method].setting_flags if method in METHODS else ()
    foreign = [f for f in setting if f not in allowed]
    if foreign:
        raise UserError(f"--{foreign[0]} does not apply to a {method} checkpoint (its setting takes "
                        f"{', '.join('--' + f for f in allowed)})")
    try:
        return METHODS[method].merge_setting(saved, setting, len(arch.decoder_layers(model)))
    except ValueError as exc:
        raise UserError(f"{SETTING_FLAGS}: {exc}") from None


def load(path, *, device: str = "cpu", dtype: str = "auto", verify: bool = True, setting: dict | None = None):
    """(model, tokenizer) with the checkpoint's repair in place, in eval mode on `device`; the
    interventions attached are listed in `model.repair_interventions` (`.remove()` one to undo it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    manifest = read_manifest(path)  # a folder that is no checkpoint fails before any loading
    if verify:
        check_files(path, manifest)
    hf_logging.disable_progress_bar()  # a one-line error after loading must stay one line
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    hook = attach_saved(model, path, setting, verify=False)
    model.repair_interventions = [hook] if hook is not None else []
    return model, tokenizer
