"""Export the repaired model as a checkpoint: changed weights (a pruned checkpoint, which plain
`transformers` loads with no project code: repair.methods.prune.checkpoint) or hooked (base weights
plus the intervention's tensors, re-attached by `repair.load`), and its model card. Either
kind is written under a temporary name, reloaded and compared with the repaired model in memory, and
renamed into place, so a crash never leaves a half checkpoint under `checkpoint/`; what a crash
between the renames leaves aside is put back or removed by the next export.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from repair import failpoints
from repair.io import UMASK, sha256_file
from repair.methods import METHODS, describe
from repair.models import LoadedModel
from repair.space import STACK
from repair.stats import format_change

CHECK_TEXT = "The nurse said that the doctor"
# Reload check: max |logits diff| <= TOLERANCE[dtype] * max |logits|. Zeroing a weight slice and masking
# its input give the same sums; the slack is for the reload running on CPU and the model on a GPU.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def export_hooked(loaded: LoadedModel, method: str, tensors: dict, meta: dict, target: Path, manifest: dict,
                  card: str, *, models: dict | None = None, expected=None) -> Path:
    """Write a hooked checkpoint: the unchanged base weights (plain transformers loads them, without
    the repair), the intervention's tensors and settings in `interventions.safetensors`, `models`
    (name -> model, the experts) as checkpoint folders beside them, and the manifest with every
    weight file's sha256; `repair.load` re-attaches the intervention. The check reloads it through
    `repair.load` and compares with `expected(ids)`, by default the hooked model's logits in memory."""
    from repair.load import INTERVENTIONS, attach

    def hooked(ids):
        hook = attach(loaded.model, method, tensors, meta)
        try:
            return loaded.model(ids).logits
        finally:
            hook.remove()

    extra = {INTERVENTIONS: (tensors, {"method": method, **{k: json.dumps(v) for k, v in meta.items()}})}
    return write_checkpoint(loaded, loaded.model.state_dict(), None, target, manifest, card, extra, expected or hooked,
                             models)


def write_checkpoint(loaded: LoadedModel, state: dict, dtype, target: Path, manifest: dict, card: str,
                      extra: dict | None, expected, models: dict | None = None) -> Path:
    """Write the checkpoint under a temporary name, reload it and compare its logits with `expected`
    (the repaired model in memory), then rename it into place; a crash leaves no half checkpoint."""
    model = loaded.model
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crash mid-export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        del state
        _fix_config(tmp / "config.json", dtype)
        failpoints.reached("export")
        loaded.tokenizer.save_pretrained(tmp)
        for name, (tensors, meta) in (extra or {}).items():
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / name), metadata=meta)
        for name, extra_model in (models or {}).items():
            extra_model.save_pretrained(tmp / name, safe_serialization=True)
        manifest = {**manifest, "files_sha256": {f.relative_to(tmp).as_posix(): sha256_file(f)
                                                 for f in sorted(tmp.rglob("*.safetensors"))}}
        (tmp / "repair_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        for f in tmp.rglob("*"):  # safetensors writes 0600; the checkpoint is as shareable as the user's files
            f.chmod((0o777 if f.is_dir() else 0o666) & ~UMASK)
        failpoints.reached("export")
        _check_reload(loaded, expected, tmp)
        failpoints.reached("export")
        old = _aside(target)
        if target.exists():
            target.rename(old)
            failpoints.reached("export")
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _recover(target)
        raise
    return target


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _recover(target: Path) -> None:
    """After a crash between the two renames the previous checkpoint (complete) is only aside: put it
    back; if the new one made it into place, the one aside is stale: remove it."""
    old = _aside(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)


def _fix_config(path: Path, dtype: torch.dtype | None) -> None:
    """The saved config describes plain float weights: no quantization, and the dtype they were written in."""
    config = json.loads(path.read_text())
    fixed = {k: v for k, v in config.items() if k != "quantization_config"}
    if dtype is not None:
        fixed.update({k: str(dtype).replace("torch.", "") for k in ("dtype", "torch_dtype") if k in fixed})
    if fixed != config:
        path.write_text(json.dumps(fixed, indent=2, sort_keys=True) + "\n")


@torch.inference_mode()
def _check_reload(loaded: LoadedModel, expected, folder: Path) -> None:
    """The exported checkpoint, loaded the way a user loads it (`repair.load`: plain transformers plus
    any intervention, on CPU, in the dtype it was saved in), must give the repaired model's logits,
    up to a tolerance relative to the logits' scale."""
    from repair.load import load

    ids = torch.tensor([loaded.tokenizer(CHECK_TEXT).input_ids])
    reloaded, _ = load(folder, device="cpu", verify=False)
    model = loaded.model
    want = expected(ids.to(next(model.parameters()).device)).float().cpu()
    got = reloaded(ids).logits.float()  # every part, the experts' shift included, acts inside the forward
    dtype = next(reloaded.parameters()).dtype
    worst = (want - got).abs().max().item()
    scale = want.abs().max().item()
    del reloaded
    if not worst <= TOLERANCE.get(dtype, 5e-2) * scale:
        raise RuntimeError(f"exported checkpoint differs from the repaired model (max |diff| {worst:.3g} at logits "
                           f"up to {scale:.3g}, {dtype}); not exported")


def _what_was_done(manifest: dict) -> list[str]:
    if manifest["key"] == "base":
        excluded = manifest.get("excluded_on_select") or []
        return ["fairness-repair kept the **unrepaired model**: no repaired configuration passed the guards on the",
                "held-out select split (utility bound, kl_uniform not rising, the neutral reference in place), so this",
                "checkpoint is the model as it was." + (" The finalists and the guards each failed:" if excluded else ""),
                *[f"- {r['config']}: {'; '.join(r['failed'])}" for r in excluded]]
    method = manifest["method"]
    parts = manifest.get("stack") or {method: manifest}
    lines = [f"Made by fairness-repair (`{method}`): " + (f"the best configurations of {' and '.join(parts)} applied "
                                                          "together:" if method == STACK else describe(method, manifest) + ".")]
    lines += [f"- {m}: {describe(m, c)}" for m, c in parts.items()] if method == STACK else []
    lines += [METHODS[m].explanation for m in parts if METHODS[m].explanation]
    if all(METHODS[m].changes_weights for m in parts):
        return lines
    return lines + ["", "The weights in this folder are the base model's" + (", with the changes of "
                    + " and ".join(m for m in parts if METHODS[m].changes_weights) + " in place"
                    if any(METHODS[m].changes_weights for m in parts) else "") + "; what the other parts add is in",
                    "`interventions.safetensors` (and the folders beside it). Load it repaired with `model, tokenizer =",
                    "repair.load(path)` (plain transformers loads the model without those parts)."]


def model_card(manifest: dict) -> str:
    from repair.objectives import ALWAYS_SHOWN, shown_label

    rep = manifest["metrics"]["report"]
    changes = (manifest.get("changes") or {}).get("report") or {}
    obj = manifest["objectives"]
    lines = [
        f"# Fairness-repaired {manifest['model']['spec']}",
        "",
        *_what_was_done(manifest),
        "",
        "Chosen on the held-out `select` split; the numbers below are from the `report` split, which no",
        "choice has seen. Changes carry paired bootstrap 95% intervals (`*`: the interval excludes 0).",
        "",
        "| report split | unrepaired | repaired | change [paired 95% CI] |",
        "|---|---|---|---|",
        f"| fairness: {obj['fairness']['name']} ({obj['fairness']['better']} is better) | "
        f"{rep['base']['fairness']:.4f} | {rep['repaired']['fairness']:.4f} | {format_change(changes.get('fairness'))} |",
        f"| utility: {obj['utility']['name']} ({obj['utility']['better']} is better) | "
        f"{rep['base']['utility']:.4f} | {rep['repaired']['utility']:.4f} | {format_change(changes.get('utility'))} |",
        *[f"| {shown_label(key, rep['base'][key]['better'])} | {rep['base'][key]['value']:.4f} | "
          f"{rep['repaired'][key]['value']:.4f} | {format_change(changes.get('metrics', {}).get(key))} |"
          for key in ALWAYS_SHOWN if key in rep["base"] and key in rep["repaired"]],
        "",
        "Every metric with its 95% bootstrap interval, on all three splits, is in `repair_manifest.json`.",
        "",
        f"Command: `{' '.join(manifest['command'])}`",
        "",
    ]
    return "\n".join(lines)
