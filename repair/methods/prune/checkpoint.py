"""A pruned checkpoint: the chosen heads' slices of the attention output projection zeroed in the saved
weights (transformers 5 has no physical head pruning that survives a reload, see
`repair.methods.prune.heads`). The state dict saved is the model's own tensors except the projections
that get zeroed, which are cloned to CPU, so a model on a GPU or sharded by `--device-map` is exported
without a second copy of it. Plain transformers loads it, no project code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from repair.export import write_checkpoint
from repair.methods.prune.heads import HeadMasker, attention_output, decoder_layers, head_layout, zero_heads
from repair.models import LoadedModel


def pruned_state_dict(model: torch.nn.Module, mask: np.ndarray) -> tuple[dict, list[list[int]]]:
    """The state dict to save for `model` with the heads whose mask bit is 0 zeroed, and those heads as
    sorted [layer, head] pairs. Every tensor is the model's own, except the attention output weights
    of layers with a pruned head: those are zeroed copies on CPU. The model itself is not changed."""
    n_layers, n_heads, hd = head_layout(model)
    mask = np.asarray(mask)
    if mask.shape != (n_layers, n_heads) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask must be a 0/1 array of shape {(n_layers, n_heads)}, got {mask.shape}")
    pruned = sorted([int(l), int(h)] for l, h in zip(*np.nonzero(mask == 0)))
    names = {id(m): n for n, m in model.named_modules()}
    state = model.state_dict()
    layers = decoder_layers(model)
    for layer in sorted({l for l, _ in pruned}):
        module = attention_output(layers[layer], model)
        weight = module.weight.detach().to("cpu", copy=True)
        zero_heads(model, module, weight, [h for l, h in pruned if l == layer], hd)
        state[f"{names[id(module)]}.weight"] = weight
    return state, pruned


def export_pruned(loaded: LoadedModel, mask: np.ndarray, target: Path, manifest: dict, card: str,
                  dtype: torch.dtype | None = None) -> Path:
    """Write the pruned checkpoint to `target` in the loaded model's dtype, or in `dtype` (which makes
    a converted copy of every weight on CPU)."""
    state, pruned = pruned_state_dict(loaded.model, mask)
    assert pruned == manifest["pruned_heads"], "manifest and mask disagree"
    if dtype is not None:
        state = {k: v.to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}

    def expected(ids):
        with HeadMasker(loaded.model, torch.from_numpy(mask[None].astype(np.float32))):
            return loaded.model(ids).logits

    return write_checkpoint(loaded, state, dtype, target, manifest, card, None, expected)
