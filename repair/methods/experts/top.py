"""Experts that share the target's trunk: only the top K decoder layers of each expert learn
(`training.fine_tune`), so below layer L-K an expert computes exactly what the target computes. An
`ExpertTop` keeps those K trained layers alone and runs them on the target's own hidden state at
layer L-K, read while the target's forward passes it: one trunk forward, three tops. The final norm
and the output layer are the target's (they do not learn), so an expert costs K layers of weights
and of compute instead of a whole model.

The top layers receive what the target's layer L-K receives (the attention mask the model built, the
position ids and rotary embeddings, the KV cache role), with a KV cache of their own, so their
numbers are those of the full expert model to float tolerance (`tests/test_expert_top.py`). In a
stack, the trunk is the repaired target's: the experts read the hidden state the other parts left.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

TOP_FILE, TOP_META = "top.safetensors", "top.json"


def copy_without_hooks(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` without the forward and backward hooks on it or its submodules. An expert
    is a model of its own: the interventions hooked on the target when it is copied (a stack's neutralizer
    or steering, the evaluator's fan-out) are the target's, and deepcopy would carry them, with copies of
    the objects they are bound to, into the copy."""
    memo = {}
    for m in module.modules():
        for name, value in vars(m).items():
            if name.startswith(("_forward_", "_backward_")) and isinstance(value, dict):
                memo[id(value)] = type(value)()  # deepcopy takes this fresh, empty dict as the copy of the hooks
    return copy.deepcopy(module, memo)


def keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states a CausalLM runs its head on for `logits_to_keep` (transformers' rule: 0 all,
    an int the last ones, a boolean [B, T] mask flattened row-major)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


class ExpertTop(torch.nn.Module):
    """An expert's trained top K decoder layers over a target's trunk (see the module docstring)."""

    def __init__(self, target, k: int, state: dict | None = None):
        from repair import arch

        super().__init__()
        layers = arch.decoder_layers(target, "shared-trunk experts")
        if not 1 <= k <= len(layers):
            raise ValueError(f"an expert top of {k} layers on a model of {len(layers)}")
        self.start, self.k = len(layers) - k, k
        self.layers = torch.nn.ModuleList(copy_without_hooks(layer) for layer in layers[self.start:])
        if state is not None:
            self.layers.load_state_dict(state)
        self.layers.requires_grad_(False).eval()
        self._target = [target]  # not a submodule: its weights are the target's, neither saved nor counted

    @classmethod
    def from_model(cls, target, expert, k: int) -> "ExpertTop":
        """The top K layers of `expert`, a full copy of `target` whose lower layers did not learn."""
        from repair import arch

        top = cls(target, k)
        top.layers.load_state_dict(torch.nn.ModuleList(arch.decoder_layers(expert)[top.start:]).state_dict())
        return top

    @property
    def target(self):
        return self._target[0]

    def normed(self, hidden: torch.Tensor, layer_kwargs: dict, cache, logits_to_keep=0) -> torch.Tensor:
        """The final norm's output at the kept positions, from the trunk's hidden state at layer L-K
        (`hidden`, with the kwargs that layer got), with this top's own KV cache (or None)."""
        from repair import arch

        kwargs = dict(layer_kwargs)
        kwargs["cache" if "cache" in kwargs else "past_key_values"] = cache
        for layer in self.layers:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return keep_positions(arch.final_norm(self.target)(hidden), logits_to_keep)

    def logits(self, hidden: torch.Tensor, layer_kwargs: dict, cache, logits_to_keep=0) -> torch.Tensor:
        """The logits at the kept positions (`normed`, then the target's output layer)."""
        return self.target.get_output_embeddings()(self.normed(hidden, layer_kwargs, cache, logits_to_keep))

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        """The trained layers only (the bundle's and the run's storage), with what rebuilds them."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.layers.state_dict().items()}, str(folder / TOP_FILE))
        (folder / TOP_META).write_text(json.dumps({"layers": self.k, "start": self.start}) + "\n")


@torch.no_grad()
def plain_head(model) -> bool:
    """Whether `model`'s logits are its output layer on its backbone's output and nothing more (no
    soft-cap after it), which a top's logits and the head fold rely on; checked on a few tokens."""
    ids = torch.arange(3, 9, device=next(model.parameters()).device)[None] % model.get_input_embeddings().weight.shape[0]
    want = model(input_ids=ids).logits.float()
    got = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state).float()
    return bool((want - got).abs().max() <= 1e-3 * (1 + want.abs().max()))


def is_top(folder: Path) -> bool:
    return (Path(folder) / TOP_META).is_file()


def load_top(folder: Path, target) -> ExpertTop:
    """An ExpertTop saved in `folder`, over `target`; ValueError when it does not fit the target."""
    from safetensors.torch import load_file

    from repair import arch

    meta = json.loads((Path(folder) / TOP_META).read_text())
    n = len(arch.decoder_layers(target))
    if meta["start"] + meta["layers"] != n:
        raise ValueError(f"the experts' top layers start at layer {meta['start']} of a {meta['start'] + meta['layers']}-layer "
                         f"model, but the target has {n} layers")
    param = next(target.parameters())
    state = {k: v.to(param.device, param.dtype) for k, v in load_file(str(Path(folder) / TOP_FILE)).items()}
    try:
        return ExpertTop(target, meta["layers"], state)
    except RuntimeError as exc:  # load_state_dict: shapes or names that are not the target's
        raise ValueError(f"the experts' top layers do not fit the target: {str(exc).splitlines()[0]}") from None


class TrunkReader:
    """Reads the target's input to layer `start` (the hidden state and the layer's kwargs) at every
    forward, for the tops to run on; `rows(r)` gives those of batch rows `r`."""

    def __init__(self, target, start: int):
        from repair import arch

        self.hidden, self.kwargs = None, None
        self.handle = arch.decoder_layers(target)[start].register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs):
        self.hidden = args[0] if args else kwargs["hidden_states"]
        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def rows(self, r: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The hidden state and kwargs of batch rows `r` (tensors with a batch dimension are sliced)."""
        batch = self.hidden.shape[0]

        def pick(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
                return v[r]
            if isinstance(v, tuple):
                return tuple(pick(x) for x in v)
            if isinstance(v, dict):
                return {k: pick(x) for k, x in v.items()}
            return v

        return self.hidden[r], {k: pick(v) for k, v in self.kwargs.items()}

    def remove(self) -> None:
        self.handle.remove()
