"""FairMed's neutralizer: at the MLP output of the selected layers, move each position's activation
a few gradient steps towards where the layer's probers predict the target group distribution.

At every position a forward sees (prompt tokens, option tokens, each new token of `generate()` with
the KV cache: the operation is per position, so cached and uncached decoding agree), for each batch
row's setting:

    kl(x)  = sum over attributes of KL(prober_a(x) || target_a)
    gate   : treat the position only where kl(x) > the setting's threshold (a quantile of kl over the
             search prompts, calibrated per layer; level 0 treats every position)
    steps  : `steps` moves of length lambda * |x| / steps along -grad kl / |grad kl|, the total
             change projected back onto the ball of radius lambda * |x|

The gradient is exact and needs no autograd (the probers are affine, see repair.methods.fairmed.probers), so the hook
runs under `torch.inference_mode()` and costs a few (d x G) products per layer. The math is done in
float32 and the result cast back to the activation's dtype (bfloat16 on a GPU). Weights are never
touched; `remove()` leaves the model as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from repair.methods.fairmed.probers import GATE_QUANTILES, TARGETS, Probers, mlp_modules
from repair.methods.rows import PerRowHooks, hidden_size


@dataclass(frozen=True)
class NeutralizerSetting:
    """One configuration: which layers, how far (`lam`, a fraction of the activation's norm), in how
    many steps, gated at which quantile level, towards which target. No layers: the unrepaired model."""

    layers: tuple[int, ...] = ()
    lam: float = 0.1
    steps: int = 3
    gate: float = 0.0  # one of GATE_QUANTILES
    target: str = "neutral"  # or "uniform"

    def check(self, n_layers: int) -> None:
        """ValueError naming the first field out of range (the CLI turns it into one line)."""
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range (the model has layers 0..{n_layers - 1})")
        if not self.lam >= 0:
            raise ValueError(f"lambda must be 0 or more, got {self.lam}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.gate not in GATE_QUANTILES:
            raise ValueError(f"gate must be one of {', '.join(map(str, GATE_QUANTILES))}, got {self.gate}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")


class Neutralizer(PerRowHooks):
    """Neutralize MLP outputs during forwards, one setting per batch row; removable.

        with Neutralizer(model, probers, [NeutralizerSetting((20, 25), 0.2, 3, 0.5)]) as hook:
            model.generate(...)                       # one setting: every row uses it
        hook.set_settings([s0, s1, s2]); hook.set_rows([0, 1, 2, 1])   # many settings, one forward

    The interface is the one every intervention shares: `set_variants`, `set_rows`, `remove`.
    """

    def __init__(self, model, probers: Probers, settings: Sequence[NeutralizerSetting] = (NeutralizerSetting(),)):
        self.model, self.probers = model, probers
        self.modules = mlp_modules(model)
        if len(self.modules) != probers.n_layers:
            raise ValueError(f"the probers have {probers.n_layers} layers but the model has {len(self.modules)}")
        width = getattr(self.modules[0], "out_features", None) or hidden_size(model)
        if width != probers.width:
            raise ValueError(f"the probers read activations of width {probers.width} but the model's MLP outputs "
                             f"have width {width}")
        self.set_variants(settings)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def set_variants(self, settings: Sequence[NeutralizerSetting]) -> None:
        """New settings, without re-registering hooks; forgets the row assignment."""
        settings = list(settings)
        if not settings:
            raise ValueError("need at least one setting")
        for s in settings:
            s.check(self.probers.n_layers)
        self.settings = settings
        L = self.probers.n_layers
        self._active = torch.zeros(len(settings), L, dtype=torch.bool)
        for v, s in enumerate(settings):
            self._active[v, list(s.layers)] = True
        self._treated = {l for s in settings for l in s.layers}  # the other layers' hooks return at once
        self._lam = torch.tensor([s.lam for s in settings], dtype=torch.float32)
        self._steps = torch.tensor([s.steps for s in settings])
        t = torch.tensor([TARGETS.index(s.target) for s in settings])
        g = torch.tensor([GATE_QUANTILES.index(s.gate) for s in settings])
        self._threshold = self.probers.gate_kl[t, :, g]  # (V, L)
        self._log_target = torch.stack([self.probers.targets[s.target] for s in settings]).log()  # (V, G)
        self._rows, self._shared = None, []

    set_settings = set_variants

    def first_layer(self, variants) -> int | None:
        """The first layer any of `variants` treats (None: none does)."""
        active = self._active[torch.as_tensor(list(variants), dtype=torch.long)].any(0).nonzero()
        return int(active[0, 0]) if len(active) else None

    def _hook(self, layer: int):
        def hook(module, args, output):
            if layer not in self._treated:
                return None
            out = output[0] if isinstance(output, tuple) else output
            rows = self._row_ids(out.shape[0])
            active = self._active[rows, layer]
            if not bool(active.any()):
                return None
            changed = self.neutralize(out, layer, rows, active)
            return (changed, *output[1:]) if isinstance(output, tuple) else changed
        return hook

    def neutralize(self, out: torch.Tensor, layer: int, rows: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """`out` (B, T, d) with the treated rows' positions moved; the other rows untouched."""
        dev = out.device
        sel = active.nonzero()[:, 0]  # only the rows whose setting treats this layer
        r = rows[sel]
        x = out[sel.to(dev)].float()
        log_t = self._log_target[r].to(dev)[:, None, :]
        kl, grad = self.probers.kl_to_target(x, layer, log_t)
        fires = kl > self._threshold[r, layer].to(dev)[:, None]  # (b, T)
        radius = self._lam[r].to(dev)[:, None] * x.norm(dim=-1)  # (b, T)
        steps = self._steps[r].to(dev)
        delta = torch.zeros_like(x)
        for s in range(int(steps.max())):
            if s:
                _, grad = self.probers.kl_to_target(x + delta, layer, log_t)
            move = fires & (s < steps)[:, None]
            step = (radius / steps[:, None])[..., None] * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = torch.where(move[..., None], delta - step, delta)
            norm = delta.norm(dim=-1, keepdim=True)
            delta = delta * torch.clamp(radius[..., None] / norm.clamp_min(1e-12), max=1.0)
        result = out.clone()
        result[sel.to(dev)] = (x + delta).to(out.dtype)
        return result

    def describe(self) -> str:
        s = self.settings[0]
        return (f"FairMed neutralizer: layers {list(s.layers)}, lambda {s.lam:g}, {s.steps} steps, gate {s.gate:g}, "
                f"target {s.target}")
