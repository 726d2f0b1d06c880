"""FairSteer's steering hook: at one decoder layer's output (the residual stream), add the debiasing
direction where the layer's probe says the activation is biased.

For every position a forward sees (prompt tokens, option tokens, each new token of `generate()` with
the KV cache: the decision is per position, so cached and uncached decoding agree) and each batch
row's own setting:

    fires = sigmoid(w . x + b) > threshold      (always, for an always-on setting)
    x    += alpha * mean_norm * direction        where it fires

The published code decides for a whole batch from its first row and copies activations to host
memory at every step; here each row and position is gated on its own, on the model's device, inside
one batched forward. The arithmetic is float32, cast back to the activation's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from repair.methods.fairsteer.steering import Steering, residual_modules
from repair.methods.rows import PerRowHooks, hidden_size


@dataclass(frozen=True)
class SteerSetting:
    """One configuration: the steered layer (None: the unrepaired model), the strength as a fraction
    of that layer's mean activation norm, and the gate's probability threshold (None: always on)."""

    layer: int | None = None
    alpha: float = 0.0
    threshold: float | None = 0.5

    def check(self, n_layers: int) -> None:
        """ValueError naming the first field out of range (the CLI turns it into one line)."""
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise ValueError(f"layer {self.layer} is out of range (the model has layers 0..{n_layers - 1})")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be 0 or more, got {self.alpha}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")


class Steerer(PerRowHooks):
    """Gated steering during forwards, one setting per batch row; removable.

        with Steerer(model, steering, [SteerSetting(14, 0.35, 0.5)]):
            model.generate(...)
        hook.set_variants([s0, s1]); hook.set_rows([0, 1, 1])   # many settings, one forward
    """

    def __init__(self, model, steering: Steering, settings: Sequence[SteerSetting] = (SteerSetting(),)):
        self.model, self.steering = model, steering
        self.modules = residual_modules(model)
        if len(self.modules) != steering.n_layers:
            raise ValueError(f"the steering vectors have {steering.n_layers} layers but the model has {len(self.modules)}")
        width = hidden_size(model)
        if width is not None and width != steering.width:
            raise ValueError(f"the steering vectors have width {steering.width} but the model's hidden size is {width}")
        self.set_variants(settings)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def set_variants(self, settings: Sequence[SteerSetting]) -> None:
        settings = list(settings)
        if not settings:
            raise ValueError("need at least one setting")
        for s in settings:
            s.check(self.steering.n_layers)
        self.settings = settings
        self._layer = torch.tensor([-1 if s.layer is None else s.layer for s in settings])
        self._steered = {s.layer for s in settings if s.layer is not None}  # the other layers' hooks return at once
        self._alpha = torch.tensor([s.alpha for s in settings], dtype=torch.float32)
        # an always-on setting: a threshold no probability stays under
        self._threshold = torch.tensor([-1.0 if s.threshold is None else s.threshold for s in settings])
        self._rows, self._shared = None, []

    def first_layer(self, variants) -> int | None:
        """The first layer any of `variants` steers (None: none does)."""
        layers = [self.settings[v].layer for v in variants if self.settings[v].layer is not None]
        return min(layers, default=None)

    def _hook(self, layer: int):
        def hook(module, args, output):
            if layer not in self._steered:
                return None
            out = output[0] if isinstance(output, tuple) else output
            rows = self._row_ids(out.shape[0])
            sel = (self._layer[rows] == layer).nonzero()[:, 0]
            if not len(sel):
                return None
            changed = self.steer(out, layer, rows[sel], sel)
            return (changed, *output[1:]) if isinstance(output, tuple) else changed
        return hook

    def steer(self, out: torch.Tensor, layer: int, variants: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """`out` (B, T, d) with rows `sel` (using settings `variants`) steered where their gate fires."""
        dev, st = out.device, self.steering
        sel = sel.to(dev)
        x = out[sel].float()
        p = torch.sigmoid(x @ st.w[layer].to(dev) + st.b[layer].to(dev))  # (b, T)
        fires = p > self._threshold[variants].to(dev)[:, None]
        push = (self._alpha[variants].to(dev) * st.scale[layer].to(dev))[:, None, None] * st.direction[layer].to(dev)
        result = out.clone()
        result[sel] = torch.where(fires[..., None], x + push, x).to(out.dtype)
        return result

    def describe(self) -> str:
        s = self.settings[0]
        gate = "always on" if s.threshold is None else f"where P(biased) > {s.threshold:g}"
        return f"FairSteer steering: layer {s.layer}, alpha {s.alpha:g}, {gate}"
