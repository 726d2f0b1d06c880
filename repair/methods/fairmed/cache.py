"""FairMed's probers for a model, fitted, scored and kept in one folder (a run's `fairmed/`, or
`repair probe --out DIR`).

The folder is a cache. `activations.npz` holds the probe data (the slow part: every search-split
association prompt through the model twice, its MLP outputs read at three positions each), `probers.safetensors` the fitted probers and
`probe-scores.json` their held-out scores with the sha256 of both files, the fit settings and the
suite data's sha256. A rerun reuses what still matches:

- activations are reused when they were measured on the same model (architecture, size, dtype,
  source) and the same suite data, split and attributes; another model's are refused, not
  overwritten, since recomputing them is what the cache saves;
- probers are reused when the scores file names the same activations and settings; they are read
  back and their sha256 checked against the scores file, so a probers file that changed since it was
  fitted is refused rather than trusted (the neutralizer acts on whatever the file says);
- anything else (new settings, recomputed activations, a missing file) refits from the activations.

In a run the activations are the run's one probe pass (repair.methods.probe_pass, kept in the run
folder for every method): the folder then holds only the probers and their scores, which name the
pass's sha256.

Every file is written atomically: a temporary name in the same folder, then os.replace.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from repair.errors import OutputError, UserError
from repair.io import sha256_file, write_json_atomic

if TYPE_CHECKING:  # repair.methods.fairmed.probers imports torch: the CLI builds its parser without it
    from repair.methods.fairmed.probers import Probers, ProbeData

ACTIVATIONS = "activations.npz"
PROBERS = "probers.safetensors"
SCORES = "probe-scores.json"
HEATMAP = "heatmap.svg"
BEST = 5  # layers named on format_scores' last line


def probe(loaded, eval_config, folder: Path, *, seed: int = 0, progress: bool = True,
          fit_settings: dict | None = None, source=None) -> tuple[Probers, list[dict]]:
    """The probers and their held-out scores for `loaded` on `eval_config`'s association prompts,
    cached in `folder` (created if missing; see the module docstring for what is reused).
    `fit_settings`: dims, l2_grid and/or folds for repair.methods.fairmed.probers.fit, its defaults otherwise.
    `source`: where a run's probe data comes from (a repair.methods.probe_pass.PassSite, the run's
    one pass for every method); the folder then keeps no activations of its own, and the probers are
    refitted when the pass they were fitted on has been replaced."""
    from repair.methods.fairmed.probers import DIMS, FOLDS, L2_GRID, Probers
    from repair.suites.association import load_data

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, exc) from None
    _, data_sha, _ = load_data()
    key = data_key(loaded, eval_config, data_sha)
    settings = {"dims": DIMS, "l2_grid": L2_GRID, "folds": FOLDS, **(fit_settings or {})}
    unknown = set(settings) - {"dims", "l2_grid", "folds"}
    if unknown:
        raise TypeError(f"unknown fit settings {sorted(unknown)}")
    settings = {**settings, "l2_grid": [float(x) for x in settings["l2_grid"]], "seed": seed}
    acts_path, probers_path, scores_path = folder / ACTIVATIONS, folder / PROBERS, folder / SCORES
    record = _read_scores(scores_path)

    if source is not None:
        kept = source.recorded()  # None: the pass is not kept (any more); the probers' own sha256 still guards them
        reuse = record is not None and (kept is None or record.get("activations_sha256") == kept)
        load, acts_sha = source.data, None
    else:
        fresh = not acts_path.exists()
        if fresh:
            from repair.methods.fairmed.probers import probe_data

            data = probe_data(loaded, eval_config, progress=progress)
            save_data(acts_path, data, key)
        else:
            data = load_data_file(acts_path, key)
        acts_sha = sha256_file(acts_path)
        if record is not None and not fresh and record.get("activations_sha256") != acts_sha:
            raise UserError(f"{acts_path} changed since the probers in {folder} were fitted on it (its sha256 differs "
                            f"from {SCORES}'s); delete it to recompute")
        reuse = record is not None and not fresh
        load = lambda: data  # noqa: E731
    if reuse and record.get("data") == key and record.get("settings") == settings and probers_path.exists():
        if sha256_file(probers_path) != record.get("probers_sha256"):
            raise UserError(f"{probers_path} is not the file that was fitted (its sha256 differs from {SCORES}'s); "
                            f"delete it to recompute")
        return Probers.load(probers_path), record["scores"]

    from repair.methods.fairmed.probers import fit

    data = load()
    probers, scores = fit(data, **settings)
    probers_sha = _replace_with(probers_path, probers.save)
    write_json_atomic(scores_path, {
        "scores": scores, "activations_sha256": acts_sha or source.sha256(), "probers_sha256": probers_sha,
        "settings": settings, "data_sha256": data_sha, "data": key,
    })
    return probers, scores


def data_key(loaded, eval_config, data_sha: str) -> dict:
    """What the activations depend on: the model as loaded (not where it runs), the suite's prompts and
    the positions read in each."""
    from repair.methods.fairmed.probers import POSITIONS  # torch, through repair.methods.fairmed.probers: the CLI builds its parser without it

    model = {k: v for k, v in loaded.describe().items() if k not in ("device", "spec")}
    attributes = list(eval_config.attributes) if eval_config.attributes else None
    return {"model": model, "data_sha256": data_sha, "split": eval_config.split, "attributes": attributes,
            "positions": list(POSITIONS)}


def _replace_with(path: Path, write) -> str:
    """Call write(temp path) for a temporary file beside `path`, then move it into place; write's return
    value is passed on. Nothing is left under either name when it fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(path, exc) from None
        raise
    return result


def save_data(path: Path, data: ProbeData, key: dict) -> None:
    """ProbeData as an .npz (`write_npz`), atomically."""
    write_npz(path, {"activations": data.activations}, data, {"key": key})


def load_data_file(path: Path, key: dict | None = None) -> ProbeData:
    """ProbeData from `save_data`'s file; with `key`, a UserError unless it was measured for that key."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            data = read_npz(z, meta, "activations")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable probe cache ({type(exc).__name__}); delete it to recompute") from None
    if key is not None and meta["key"] != key:
        raise UserError(f"{path} {measured_for_another(meta['key'], key)}; delete it to recompute, or choose another folder")
    return data


def measured_for_another(found, key: dict) -> str:
    """What a kept activations file's key `found` differs in from this run's `key`, said in words."""
    what = [k for k in key if not isinstance(found, dict) or found.get(k) != key[k]]
    return f"holds activations of another {' and '.join(what)} than this run's"


def write_npz(path: Path, activations: dict, data: ProbeData, meta: dict) -> None:
    """An .npz of `activations` (name -> array) and `data`'s per-row fields (distributions padded with
    NaN to the widest attribute; groups and each row's stereotyped groups in the JSON `meta`, with
    `meta`'s own entries), written atomically."""
    width = max(len(g) for g in data.groups.values())
    dists = np.full((len(data.distributions), width), np.nan, dtype=np.float64)
    for i, d in enumerate(data.distributions):
        dists[i, :len(d)] = d
    meta = json.dumps({**meta, "groups": {a: list(g) for a, g in data.groups.items()},
                       "stereotyped": [list(s) for s in data.stereotyped]})

    def write(tmp: Path):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **activations, attributes=np.array(data.attributes, dtype=str),
                     concepts=np.array(data.concepts, dtype=str), neutral=data.neutral, distributions=dists,
                     meta=np.array(meta))
            f.flush()
            os.fsync(f.fileno())

    _replace_with(path, write)


def read_npz(z, meta: dict, activations: str) -> ProbeData:
    """ProbeData from an open `write_npz` file `z` (its parsed `meta`), with the activations named `activations`."""
    from repair.methods.fairmed.probers import ProbeData

    n_groups = {a: len(g) for a, g in meta["groups"].items()}
    attributes = tuple(str(a) for a in z["attributes"])
    return ProbeData(z[activations], attributes, tuple(str(c) for c in z["concepts"]), z["neutral"].astype(bool),
                     tuple(row[:n_groups[a]] for row, a in zip(z["distributions"], attributes)),
                     {a: tuple(g) for a, g in meta["groups"].items()},
                     tuple(tuple(s) for s in meta.get("stereotyped", ())))


def _read_scores(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON; delete it to recompute") from None
    return record if isinstance(record, dict) else None


# ---- presentation --------------------------------------------------------------------------------

def layer_summary(scores: list[dict]) -> list[dict]:
    """Per layer, means over attributes: macro_f1, majority_f1, gain (their difference), kl, kl_mean;
    `beats`: attributes whose macro-F1 is above the majority baseline's, of `n` attributes."""
    by_layer: dict[int, list[dict]] = {}
    for s in scores:
        by_layer.setdefault(int(s["layer"]), []).append(s)
    rows = []
    for layer in sorted(by_layer):
        cells = by_layer[layer]
        mean = {k: float(np.mean([c[k] for c in cells])) for k in ("macro_f1", "majority_f1", "kl", "kl_mean")}
        rows.append({"layer": layer, **mean, "gain": float(np.mean([c["macro_f1"] - c["majority_f1"] for c in cells])),
                     "beats": sum(c["macro_f1"] > c["majority_f1"] for c in cells), "n": len(cells)})
    return rows


def best_layers(scores: list[dict], k: int = BEST) -> list[int]:
    """The k layers with the largest mean macro-F1 gain over the majority baseline, best first."""
    return [r["layer"] for r in sorted(layer_summary(scores), key=lambda r: (-r["gain"], r["layer"]))[:k]]


def format_scores(scores: list[dict]) -> str:
    """One row per layer (means over attributes of the held-out scores), then the best layers."""
    from repair.evaluate import _text_table

    rows = [("layer", "macro-F1", "majority-F1", "gain", "KL", "KL(mean)", "beat majority")]
    for r in layer_summary(scores):
        rows.append((str(r["layer"]), f"{r['macro_f1']:.3f}", f"{r['majority_f1']:.3f}", f"{r['gain']:+.3f}",
                     f"{r['kl']:.4f}", f"{r['kl_mean']:.4f}", f"{r['beats']}/{r['n']}"))
    best = best_layers(scores)
    return (_text_table(rows) + "\n\nheld-out over concepts (grouped CV); gain = macro-F1 - majority-F1; "
            "KL(mean) = KL to the training folds' mean distribution\n"
            f"best layers by gain: {', '.join(map(str, best))}")
