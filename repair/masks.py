"""Head masks as records: one bit per query head (1 = kept), layers x heads, with a compact key."""
from __future__ import annotations

import numpy as np


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


def knockout_masks(shape: tuple[int, int]) -> list[np.ndarray]:
    """Every single-head knockout, in layer-major order."""
    out = []
    for i in range(shape[0] * shape[1]):
        bits = np.ones(shape[0] * shape[1], dtype=bool)
        bits[i] = False
        out.append(bits.reshape(shape))
    return out
