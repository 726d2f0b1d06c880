"""Head masks as records: one bit per query head (1 = kept), layers x heads, with a compact key."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repair.errors import UserError


def to_key(mask: np.ndarray) -> str:
    """A stable text key (hex of the packed bits, row-major) for storage and de-duplication."""
    return np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes().hex()


def from_key(key: str, shape: tuple[int, int]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(key), dtype=np.uint8))
    return bits[: shape[0] * shape[1]].reshape(shape).astype(bool)


def pruned_heads(mask: np.ndarray) -> list[list[int]]:
    return [[int(l), int(h)] for l, h in zip(*np.nonzero(~np.asarray(mask, dtype=bool)))]


def full_mask(shape: tuple[int, int]) -> np.ndarray:
    return np.ones(shape, dtype=bool)


def stratified_masks(n: int, shape: tuple[int, int], max_prune: float, seed: int) -> list[np.ndarray]:
    """`n` random masks whose pruned counts are stratified over (0, max_prune]: mask i prunes a count
    drawn from the i-th of n strata of a squared scale, so light pruning, where a small utility-loss
    limit can still be met, is sampled densely (half the masks prune at most a quarter of the cap)."""
    rng = np.random.default_rng(seed)
    n_bits = shape[0] * shape[1]
    cap = int(np.floor(max_prune * n_bits))
    out = []
    for i in rng.permutation(n):
        k = max(1, min(cap, int(round(((i + rng.random()) / n) ** 2 * cap))))
        bits = np.ones(n_bits, dtype=bool)
        bits[rng.choice(n_bits, size=k, replace=False)] = False
        out.append(bits.reshape(shape))
    return out


def ranked_masks(gain: np.ndarray, counts, max_pruned: int) -> list[np.ndarray]:
    """Masks pruning the k heads of largest positive `gain` (layers x heads), for each k in `counts`
    up to `max_pruned` and the number of heads with a gain at all."""
    order = np.argsort(-gain.ravel(), kind="stable")
    n_useful = int((gain.ravel() > 0).sum())
    out = []
    for k in sorted({min(int(k), max_pruned, n_useful) for k in counts} - {0}):
        bits = np.ones(gain.size, dtype=bool)
        bits[order[:k]] = False
        out.append(bits.reshape(gain.shape))
    return out


def knockout_masks(shape: tuple[int, int]) -> list[np.ndarray]:
    """Every single-head knockout, in layer-major order."""
    out = []
    for i in range(shape[0] * shape[1]):
        bits = np.ones(shape[0] * shape[1], dtype=bool)
        bits[i] = False
        out.append(bits.reshape(shape))
    return out


# ---------------------------------------------------------------- `repair evaluate --prune-heads SPEC`

_SPEC_HELP = ("give LAYER:HEAD pairs such as 0:3,5:1, or a JSON file holding a list of [layer, head] pairs "
              "(a run's checkpoint/repair_manifest.json will do) or a layers x heads 0/1 array, 1 = keep")


@dataclass(frozen=True)
class HeadSpec:
    """What `--prune-heads` asked for: parsed and checked for form here, before any model work;
    checked against the model's layout (which needs its config) by `keep_mask`."""

    source: str  # for messages: "--prune-heads" or "--prune-heads file F"
    pairs: tuple[tuple[int, int], ...] | None = None  # heads to prune
    keep: tuple[tuple[int, ...], ...] | None = None  # or a layers x heads 0/1 array, 1 = keep

    def keep_mask(self, n_layers: int, n_heads: int) -> np.ndarray:
        """The (n_layers, n_heads) bool mask, 1 = keep; UserError naming the valid shape or range."""
        if self.keep is not None:
            shape = (len(self.keep), len(self.keep[0]) if self.keep else 0)
            if shape != (n_layers, n_heads):
                raise UserError(f"{self.source}: the mask is {shape[0]} x {shape[1]} but the model has {n_layers} "
                                f"layers x {n_heads} heads (give a {n_layers} x {n_heads} array, 1 = keep, 0 = prune)")
            mask = np.array(self.keep, dtype=bool)
        else:
            mask = np.ones((n_layers, n_heads), dtype=bool)
            for layer, head in self.pairs:
                if not 0 <= layer < n_layers:
                    raise UserError(f"{self.source}: layer {layer} is out of range (the model has layers 0..{n_layers - 1})")
                if not 0 <= head < n_heads:
                    raise UserError(f"{self.source}: head {head} of layer {layer} is out of range "
                                    f"(the model has heads 0..{n_heads - 1} in each layer)")
                mask[layer, head] = False
        if not mask.any():
            raise UserError(f"{self.source} prunes all {mask.size} heads of the model; keep at least one")
        return mask


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _from_json(data, source: str) -> HeadSpec:
    if isinstance(data, dict):
        if "pruned_heads" in data:
            data = data["pruned_heads"]
        elif "mask" in data:
            return _mask_spec(data["mask"], source)
        else:
            raise UserError(f"{source}: a JSON object needs a 'pruned_heads' or 'mask' entry ({_SPEC_HELP})")
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list, found {type(data).__name__} ({_SPEC_HELP})")
    if all(isinstance(row, list) and len(row) == 2 for row in data):  # [layer, head] pairs (an empty list too)
        bad = next((row for row in data if not (_is_int(row[0]) and _is_int(row[1]))), None)
        if bad is not None:
            raise UserError(f"{source}: [layer, head] pairs must hold integers, found {bad!r}")
        return HeadSpec(source, pairs=tuple((int(l), int(h)) for l, h in data))
    return _mask_spec(data, source)


def _mask_spec(data, source: str) -> HeadSpec:
    if not (isinstance(data, list) and data and all(isinstance(row, list) and row for row in data)):
        raise UserError(f"{source}: expected a list of [layer, head] pairs or a layers x heads 0/1 array ({_SPEC_HELP})")
    widths = sorted({len(row) for row in data})
    if len(widths) > 1:
        raise UserError(f"{source}: the mask's rows have different lengths ({', '.join(map(str, widths))}); "
                        "give one row of 0/1 per layer, one entry per head")
    bad = next((x for row in data for x in row if not (x in (0, 1) and (_is_int(x) or isinstance(x, bool)))), None)
    if bad is not None:
        raise UserError(f"{source}: mask entries must be 0 (prune) or 1 (keep), found {bad!r}")
    return HeadSpec(source, keep=tuple(tuple(int(x) for x in row) for row in data))


def parse_head_spec(spec: str) -> HeadSpec:
    """Parse `--prune-heads SPEC`: `L:H,L:H,...`, or a JSON file of [layer, head] pairs (or a manifest
    holding `pruned_heads`), or of a layers x heads 0/1 array (1 = keep). A list of 2-entry rows is read
    as pairs; write a 2-head model's mask as {"mask": [[1, 0], ...]}. UserError on any malformed input."""
    import json
    import re
    from pathlib import Path

    text = spec.strip()
    if not text:
        raise UserError(f"--prune-heads is empty ({_SPEC_HELP})")
    path = Path(text).expanduser()
    if path.is_file():
        source = f"--prune-heads file {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"{source}: not UTF-8 text: {exc.reason} ({_SPEC_HELP})") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} ({_SPEC_HELP})") from None
        except OSError as exc:
            raise UserError(f"{source}: cannot read: {exc.strerror or exc}") from None
        return _from_json(data, source)
    pair = re.compile(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*")
    items = text.split(",")
    matches = [pair.fullmatch(item) for item in items]
    if all(matches):
        return HeadSpec("--prune-heads", pairs=tuple((int(m[1]), int(m[2])) for m in matches))
    if text.endswith(".json") or "/" in text or path.is_dir():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"--prune-heads file {text} {what} ({_SPEC_HELP})")
    bad = next(item for item, m in zip(items, matches) if not m)
    raise UserError(f"--prune-heads: {bad.strip()!r} is not LAYER:HEAD ({_SPEC_HELP})")
