"""Attention heads: find them across architectures, mask them during a forward, prune them for export.

Every decoder block of a causal LM ends its attention with an output projection whose *input* is the
concatenation of the per-query-head outputs, [B, T, n_heads * head_dim]. Scaling the slice h*hd:(h+1)*hd
of that input by 0 removes query head h, exactly as zeroing the matching slice of the projection weight
does (FASP, Attention Pruning). So one place per block serves both uses:

- `HeadMasker` multiplies that input by a mask in a forward pre-hook. Many mask variants can share one
  batched forward (each batch row picks its variant), which is what makes evaluating sampled masks cheap.
  Hooks fire on every forward, so masking holds inside `generate()` with the KV cache too. Nothing in the
  model's weights changes, and `remove()` leaves the model exactly as it was.
- `prune_checkpoint` zeroes the weight slices once, for an export that plain `transformers` loads.

With grouped-query attention a mask bit is one *query* head: key/value heads are shared and stay.

Architecture knowledge (where the blocks and their attention output projections are) lives in repair.arch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from repair import arch
from repair.errors import UserError
from repair.methods.rows import checked_rows, stage_rows

PURPOSE = "head pruning"


def _unsupported(model, what: str) -> UserError:
    return arch.unsupported(model, what, PURPOSE)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, in order. UserError naming the class if they cannot be found."""
    return arch.decoder_layers(model, PURPOSE)


def attention_output(layer: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """The block's attention output projection: an nn.Linear or GPT-2's Conv1D."""
    return arch.attention_output(layer, model, PURPOSE)


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear's [out, in]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if _is_conv1d(module) else module.weight.shape[1]


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(n_layers, n_query_heads, head_dim). head_dim is read off the projection's input width, so models
    whose head_dim is not hidden_size / n_heads (Gemma) come out right."""
    layers = decoder_layers(model)
    n_heads = getattr(arch.text_config(model), "num_attention_heads", None)
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise _unsupported(model, "its config has no num_attention_heads")
    width = _in_features(attention_output(layers[0], model))
    if width % n_heads:
        raise _unsupported(model, f"attention output width {width} is not a multiple of {n_heads} heads")
    return len(layers), n_heads, width // n_heads


def _check_masks(masks, shape: tuple[int, ...], what: str) -> torch.Tensor:
    masks = torch.as_tensor(masks).float()  # no detach: a mask that requires grad gives head-importance gradients
    if tuple(masks.shape[-2:]) != shape[-2:] or masks.dim() != len(shape):
        raise ValueError(f"{what} must have shape {shape} (n_layers, n_heads), got {tuple(masks.shape)}")
    return masks


class HeadMasker:
    """Scale attention heads by masks during forwards, one mask variant per batch row; removable.

        with HeadMasker(model, masks) as masker:   # masks: (V, n_layers, n_heads), 1 = keep, 0 = prune
            masker.set_rows(torch.tensor([0, 1, 2, 1]))   # variant of each row of the NEXT forward
            logits = model(input_ids).logits

    With V == 1 and no `set_rows`, every row (of any batch size) uses variant 0. Masks are kept on each
    projection's device, in its dtype, so the same code runs on CPU, CUDA bf16 or a sharded model.
    """

    def __init__(self, model: nn.Module, masks):
        self.model = model
        self.n_layers, self.n_heads, self.head_dim = head_layout(model)
        self.modules = [attention_output(layer, model) for layer in decoder_layers(model)]
        self._layer_masks: list[torch.Tensor] = []  # per layer: (V, n_heads * head_dim)
        self._row_masks: list[torch.Tensor] | None = None  # per layer: (B, n_heads * head_dim), or None
        self._shared_rows: list[torch.Tensor] = []  # the variants of a fan-out's lower stages' rows (set_rows)
        self._handles = []
        self.set_masks(masks)
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    @property
    def n_variants(self) -> int:
        return self._layer_masks[0].shape[0]

    def set_masks(self, masks) -> None:
        """Swap in new mask variants without re-registering hooks; forgets the row assignment."""
        masks = _check_masks(masks, (0, self.n_layers, self.n_heads), "masks")
        if masks.shape[0] == 0:
            raise ValueError("masks must hold at least one variant")
        self._layer_masks = []
        for layer, module in enumerate(self.modules):
            w = module.weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            # Expand each head's bit over its head_dim inputs once, here, not in every forward.
            per_input = masks[:, layer, :].repeat_interleave(self.head_dim, dim=1)
            self._layer_masks.append(per_input.to(device=w.device, dtype=dtype))
        self._changed = (masks != 1).any(-1)  # (V, n_layers): where each variant scales a head
        self._row_masks, self._shared_rows = None, []

    def set_variants(self, masks) -> None:
        """The interface every intervention shares (repair.interventions): a list of (layers, heads) masks."""
        self.set_masks(torch.as_tensor(np.stack([np.asarray(m, dtype=np.float32) for m in masks])))

    def set_rows(self, variant_ids, shared=()) -> None:
        """As repair.methods.rows.PerRowHooks.set_rows: each row's variant, and each lower fan-out stage's."""
        rows = checked_rows(variant_ids, self.n_variants)
        self._row_masks = [m[rows.to(m.device)] for m in self._layer_masks]
        self._shared_rows = [checked_rows(s, self.n_variants) for s in shared or ()]

    def first_layer(self, variants) -> int | None:
        """The first layer where any of `variants` masks a head (None: none does)."""
        changed = self._changed[torch.as_tensor(list(variants), dtype=torch.long)].any(0).nonzero()
        return int(changed[0, 0]) if len(changed) else None

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            if self._row_masks is not None:
                mask = self._row_masks[layer]
                stage = stage_rows(self._shared_rows, x.shape[0]) if x.shape[0] != mask.shape[0] else None
                if stage is not None:
                    mask = self._layer_masks[layer][stage.to(mask.device)]
                if x.shape[0] != mask.shape[0]:
                    raise RuntimeError(f"HeadMasker.set_rows was given {mask.shape[0]} rows but the forward has "
                                       f"batch size {x.shape[0]}")
                mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
            elif self.n_variants == 1:
                mask = self._layer_masks[layer][0]
            else:
                raise RuntimeError(f"HeadMasker holds {self.n_variants} variants: call set_rows before the forward")
            return (x * mask.to(x.dtype),) + tuple(args[1:])

        return hook

    def remove(self) -> None:
        """Remove every hook; the model is then exactly as before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> HeadMasker:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def prune_checkpoint(model: nn.Module, mask_2d) -> list[list[int]]:
    """Zero the attention output weight slice of every head whose mask bit is 0, IN PLACE (pass a copy if
    the caller still needs the unpruned model). Returns the pruned heads as sorted [layer, head] pairs.

    Zeroing, not shrinking: transformers 5.x removed `prune_heads` and no longer re-applies
    `config.pruned_heads` on load (GPT-2 included; a checkpoint with a narrower c_proj fails to load with a
    size mismatch), so a zeroed full-size weight is the only export that plain `from_pretrained` loads and
    that computes exactly what the masked model computes. The bias is untouched: it is added after the
    heads are summed, as it is under `HeadMasker`.
    """
    n_layers, n_heads, hd = head_layout(model)
    mask = _check_masks(mask_2d, (n_layers, n_heads), "mask_2d")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("prune_checkpoint needs a 0/1 mask; fractional head scales cannot be exported by zeroing")
    pruned = sorted([int(l), int(h)] for l, h in (mask == 0).nonzero().tolist())
    modules = [attention_output(layer, model) for layer in decoder_layers(model)]
    with torch.no_grad():
        for layer, head in pruned:
            zero_heads(model, modules[layer], modules[layer].weight, [head], hd)
    return pruned


def zero_heads(model: nn.Module, module: nn.Module, weight: torch.Tensor, heads, head_dim: int) -> None:
    """Zero, in `weight` (the attention output projection `module`'s weight, or a copy of it), the input
    slices of `heads`: what removes those query heads from the block."""
    if not weight.dtype.is_floating_point:
        raise UserError(f"{type(model).__name__}: cannot prune heads of a quantized model "
                        f"(load it in float16, bfloat16 or float32)")
    for head in heads:
        cols = slice(head * head_dim, (head + 1) * head_dim)
        if _is_conv1d(module):  # GPT-2's Conv1D stores [in, out]
            weight[cols, :] = 0
        else:
            weight[:, cols] = 0
