"""Decoding-time experts (DExperts; Tong et al.): the target's next-token logits shifted by the
difference between an expert (fine-tuned on anti-stereotypical text) and an anti-expert (on
stereotypical text), both sharing the target's vocabulary:

    rule "logits" (DExperts):       z = z_target + alpha * (z_expert - z_anti)
    rule "probs"  (Tong et al.):    z = z_target + alpha * (p_expert - p_anti)

Combining log-probabilities instead of raw logits, log p_target + alpha (log p_expert - log p_anti),
differs from the "logits" rule by one constant per position (each log-softmax subtracts its own
logsumexp), so after the softmax it is the same distribution, token for token; it is not a separate
rule (`tests/test_experts.py` checks the identity). The probability difference is the rule that
differs: it is bounded by alpha, and it ignores tokens both experts find unlikely.
DExperts filters the target's logits to their top-p nucleus before combining; scoring a fixed
option needs its probability under the full distribution, so nothing is filtered here (generation
may still sample with `top_p`, applied after the shift).

One class serves both places a model's next-token distribution is read:
- the search's evaluator (`Evaluator(..., transform=...)`): the target's and the experts' forwards run
  once per batch, and every setting (alpha, rule) of the batch is combined from those logits, so a
  whole alpha grid costs three forwards;
- the model itself, once attached (`attach()`, what `repair.load` does): hooks on the target's
  CausalLM run both experts on the same inputs (attention mask, position ids, the kept positions;
  experts trained from the target run as their top layers over its own trunk, `top.py`, and under
  the `logits` rule their shift is added to the head's input) and `model(...)` returns the combined
  logits, so every scorer that calls the model (the evaluator on a checkpoint, lm-evaluation-harness,
  a perplexity script) and plain `generate()` see the repair. With a KV cache, the experts' caches
  travel inside the target's cache object (see `_ExpertCaches`): the cache `model(...)` returns
  carries them to the next call, and generate's beam reordering and cropping reach them too.
alpha 0 returns the target's logits untouched, bit for bit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from repair.methods.rows import PerRowHooks

RULES = ("logits", "probs")


@dataclass(frozen=True)
class ExpertSetting:
    """One configuration: the strength and the combination rule (alpha 0: the unrepaired model)."""

    alpha: float = 0.0
    rule: str = "logits"

    def check(self) -> None:
        """ValueError naming the first field out of range (the CLI turns it into one line)."""
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be 0 or more, got {self.alpha}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")


def combine(target: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor, alpha: torch.Tensor,
            probs: torch.Tensor) -> torch.Tensor:
    """The combined logits (float32) for rows of logits [N, V] with per-row `alpha` [N] and rule flag
    `probs` [N] (True: probability difference); rows with alpha 0 are the target's, exactly."""
    target32 = target.float()
    by_probs, by_logits = bool(probs.any()), not bool(probs.all())  # compute only the rules some row uses
    diff = torch.softmax(expert.float(), -1) - torch.softmax(anti.float(), -1) if by_probs else None
    if by_logits:
        diff = expert.float() - anti.float() if diff is None else torch.where(probs[:, None], diff, expert.float() - anti.float())
    combined = target32 + alpha[:, None].to(target32) * diff
    return torch.where((alpha == 0)[:, None], target32, combined) if bool((alpha == 0).any()) else combined


def vocab_problem(target, experts: Sequence, names: Sequence[str] = ("the expert", "the anti-expert")) -> str | None:
    """Why `experts` cannot shift `target`'s logits (a different output vocabulary), or None."""
    want = target.get_output_embeddings().weight.shape[0]
    for name, m in zip(names, experts):
        got = m.get_output_embeddings().weight.shape[0]
        if got != want:
            return f"{name} has {got} output tokens but the target has {want}"
    return None


SHARED_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position", "logits_to_keep", "use_cache")


def _bind(module, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by name (lm-evaluation-harness passes the ids positionally)."""
    return {**dict(zip(_parameters(type(module)), args)), **kwargs}


@functools.lru_cache(maxsize=None)
def _parameters(cls) -> tuple[str, ...]:
    """The names of a model class's forward parameters, read once per class (the hooks run at every token)."""
    import inspect

    return tuple(inspect.signature(cls.forward).parameters)[1:]  # without self


def _returned_cache(output):
    """The KV cache a forward returned (transformers 5.24 renamed `past_key_values` to `cache`), or None."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


class _ExpertCaches:
    """The experts' KV caches, carried as an attribute of the target's cache object: the cache
    `model(...)` returns holds them for the next call (generate's loop, or a user's own), and the
    cache's own methods that edit it in place (beam reordering, cropping, batch selection) edit
    them too. A cache that holds keys but none of the experts' (one the plain model made) is
    refused: the experts cannot see the tokens it stands for."""

    ATTR = "_repair_expert_caches"
    EDITS = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset")

    def __init__(self, held: list, layer: int):
        self.held, self.layer = held, layer  # `layer`: one the experts' caches hold (a top's first)

    @classmethod
    def of(cls, past, n_models: int, layer: int = 0) -> "_ExpertCaches":
        """The experts' caches for a forward given the target's cache `past` (before the forward)."""
        held = getattr(past, cls.ATTR, None) if past is not None else None
        before = 0 if past is None else past.get_seq_length()
        if held is None:
            if before > 0:
                raise ValueError(f"the cache passed holds {before} positions but not the experts' caches: pass the "
                                 "cache this repaired model returned (or none)")
            return cls([None] * n_models, layer)
        for c in held.held:
            if c is not None and c.get_seq_length(held.layer) != before:
                raise ValueError(f"the experts' caches hold {c.get_seq_length(held.layer)} positions but the target's "
                                 f"{before}: the cache was edited by a method the experts do not follow")
        return held

    def ride_on(self, cache) -> None:
        """Attach to `cache`, wrapping its in-place edits (once per cache object) to reach the experts' caches."""
        setattr(cache, self.ATTR, self)
        if getattr(cache, "_repair_edits_wrapped", False):
            return
        for name in self.EDITS:
            original = getattr(cache, name, None)
            if callable(original):
                setattr(cache, name, _following(cache, name, original))
        cache._repair_edits_wrapped = True


def _following(cache, name: str, original):
    def edit(*args, **kwargs):
        result = original(*args, **kwargs)
        for c in getattr(cache, _ExpertCaches.ATTR).held:
            if c is not None:
                getattr(c, name)(*args, **kwargs)
        return result

    return edit


def _cache_argument(model) -> str:
    return "cache" if "cache" in _parameters(type(model)) else "past_key_values"


class ExpertsTransform(PerRowHooks):
    """The experts' shift of a target model's next-token logits, one setting per batch row.

        transform = ExpertsTransform(target, expert, anti, [ExpertSetting(1.5)])
        transform.attach()              # target(...) and target.generate(...) now apply it
        Evaluator(target, tok, transform=transform)     # every suite scores the combined distribution
    """

    transforms_outputs = True  # the search's evaluator combines its grid itself when given it unattached

    def __init__(self, target, expert, anti_expert, settings: Sequence[ExpertSetting] = (ExpertSetting(),)):
        from repair.methods.experts.top import ExpertTop

        self.tops = isinstance(expert, ExpertTop)  # shared trunk: the experts are top layers over the target's
        if self.tops != isinstance(anti_expert, ExpertTop) or (self.tops and expert.start != anti_expert.start):
            raise ValueError("the expert and the anti-expert must both be full models or both tops of one depth")
        problem = None if self.tops else vocab_problem(target, (expert, anti_expert))
        if problem:
            raise ValueError(problem)
        self.target, self.models = target, (expert, anti_expert)
        self.start = expert.start if self.tops else 0
        self._handles = []
        self._trunk = None
        self._aside = False
        self.set_variants(settings)

    def set_variants(self, settings: Sequence[ExpertSetting]) -> None:
        settings = list(settings)
        if not settings:
            raise ValueError("need at least one setting")
        for s in settings:
            s.check()
        self.settings = settings
        self._alpha = torch.tensor([s.alpha for s in settings], dtype=torch.float32)
        self._probs = torch.tensor([s.rule == "probs" for s in settings])
        self.forward_of = [0] * len(settings)  # the variant whose target forward each variant shares
        self._rows, self._shared = None, []

    def active(self, variants) -> bool:
        """Whether any of `variants` changes the logits (else the experts need not run)."""
        return bool((self._alpha[torch.as_tensor(list(variants), dtype=torch.long)] != 0).any())

    def apply(self, target: torch.Tensor, experts: tuple[torch.Tensor, torch.Tensor], variant: int) -> torch.Tensor:
        """Logits [N, V] under setting `variant`, from the target's and the experts' logits at the same positions."""
        if float(self._alpha[variant]) == 0:
            return target
        n, dev = target.shape[0], target.device
        return combine(target, *experts, self._alpha[variant].expand(n).to(dev), self._probs[variant].expand(n).to(dev))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The combined logits at every position of `input_ids` under setting 0, from three plain
        forwards combined here (the attached hook, if any, stands aside): the reference that the
        exported bundle's reload check and the tests compare the repaired forward with."""
        self._aside = True
        reader = self.trunk_reader()
        try:
            z = [self.target(input_ids=input_ids).logits]
            if self.tops:
                z += [top.logits(reader.hidden, reader.kwargs, None) for top in self.models]
            else:
                z += [m(input_ids=input_ids).logits for m in self.models]
        finally:
            self._aside = False
            if reader is not self._trunk:
                reader.remove()
        flat = [t.reshape(-1, t.shape[-1]) for t in z]
        return self.apply(flat[0].float(), (flat[1], flat[2]), 0).reshape(z[0].shape)

    # ---- attached to a model ----------------------------------------------------------------
    def attach(self) -> "ExpertsTransform":
        """Make the target's forward return the combined logits (and so its generate() too);
        `remove()` restores the plain forward.

        Tops under the `logits` rule fold into the target's own output layer: z_t + a (z_e - z_a) =
        W (x_t + a (x_e - x_a)) for a linear head W without bias shared by all three (the tops' head is
        the target's), so a pre-hook on the head adds a (x_e - x_a) to its input and the vocabulary
        projection, the largest matrix of a small model, runs once per token instead of three times."""
        if not self._handles:
            folds = self._folds()  # a forward of the target: before this transform's hooks are in place
            if self.tops:
                self._trunk = self.trunk_reader()
                self._handles.append(self._trunk)
            self._handles.append(self.target.register_forward_pre_hook(self._read_call, with_kwargs=True))
            if folds:
                self._handles.append(self.target.get_output_embeddings().register_forward_pre_hook(
                    self._shift_head_input, with_kwargs=True))
            self._handles.append(self.target.register_forward_hook(self._combine_outputs, with_kwargs=True))
        return self

    def _folds(self) -> bool:
        """Whether the shift can be added to the head's input (see `attach`)."""
        from repair.methods.experts.top import plain_head

        head = self.target.get_output_embeddings()
        return (self.tops and not bool(self._probs.any()) and isinstance(head, torch.nn.Linear) and head.bias is None
                and plain_head(self.target))

    def trunk_reader(self):
        """What reads the trunk for the tops: the attached one, else a new one (None for full experts)."""
        from repair.methods.experts.top import TrunkReader

        if not self.tops:
            return None
        return self._trunk if self._trunk is not None else TrunkReader(self.target, self.start)

    def top_logits(self, reader, rows: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """The tops' logits at the kept positions of batch rows `rows` of the trunk `reader` last read
        (the evaluator's shared forward)."""
        hidden, kwargs = reader.rows(rows)
        return [top.logits(hidden, kwargs, None, keep) for top in self.models]

    def remove(self) -> None:
        super().remove()
        self._trunk, self._call = None, None

    def _read_call(self, module, args, kwargs) -> None:
        """Before the target's forward: its inputs, each row's setting, the experts' caches."""
        self._call = None
        if self._aside:
            return
        inputs = _bind(module, args, kwargs)
        if inputs.get("input_ids") is None:
            raise ValueError("the decoding-time experts need input_ids (they have embeddings of their own), "
                             "not inputs_embeds")
        rows = self._row_ids(inputs["input_ids"].shape[0])
        if not (self._alpha[rows] != 0).any():
            return
        past = inputs.pop("cache", None) if "cache" in inputs else inputs.pop("past_key_values", None)
        self._call = (inputs, rows, _ExpertCaches.of(past, len(self.models), self.start))

    def _run_tops(self, inputs: dict, caches: "_ExpertCaches", normed: bool) -> list[torch.Tensor]:
        """The tops on this forward's trunk, with their caches (started when the target keeps one)."""
        from transformers import DynamicCache

        keep_cache = inputs.get("use_cache", getattr(self.target.config, "use_cache", True))
        out = []
        for k, top in enumerate(self.models):
            if caches.held[k] is None and keep_cache:
                caches.held[k] = DynamicCache()
            run = top.normed if normed else top.logits
            out.append(run(self._trunk.hidden, self._trunk.kwargs, caches.held[k], inputs.get("logits_to_keep", 0)))
        return out

    @torch.no_grad()
    def _shift_head_input(self, module, args, kwargs):
        """The head's input x_t + a (x_e - x_a) (the fold, see `attach`)."""
        if self._call is None:
            return None
        x = args[0]
        inputs, rows, caches = self._call
        expert, anti = self._run_tops(inputs, caches, normed=True)
        alpha, _ = self._per_position(rows, inputs, x)
        shift = (alpha[:, None] * (expert - anti).reshape(-1, x.shape[-1]).float()).reshape(x.shape)
        self._call = (*self._call, True)  # folded: the logits need nothing more
        return (x + shift.to(x.dtype), *args[1:]), kwargs

    @torch.no_grad()
    def _combine_outputs(self, module, args, kwargs, output):
        if self._call is None:
            return output
        inputs, rows, caches, *folded = self._call
        self._call = None
        new = _returned_cache(output)
        if not folded:
            logits = output.logits
            if self.tops:
                experts = self._run_tops(inputs, caches, normed=False)
            else:
                shared = {k: inputs[k] for k in SHARED_INPUTS if inputs.get(k) is not None}
                experts = []
                for k, model in enumerate(self.models):
                    out = model(**shared, **{_cache_argument(model): caches.held[k]})
                    caches.held[k] = _returned_cache(out)
                    experts.append(out.logits)
            alpha, probs = self._per_position(rows, inputs, logits)
            flat = [z.reshape(-1, z.shape[-1]) for z in (logits, *experts)]
            output.logits = combine(*flat, alpha, probs).reshape(logits.shape)
            labels = inputs.get("labels")
            if labels is not None and getattr(output, "loss", None) is not None:
                output.loss = module.loss_function(logits=output.logits, labels=labels, vocab_size=output.logits.shape[-1])
        if new is not None:
            caches.ride_on(new)
        return output

    def _per_position(self, rows: torch.Tensor, inputs: dict, logits: torch.Tensor):
        """Each logits row's alpha and rule flag: a batch row's, repeated over its positions (logits
        [B, T, V]) or over its kept positions (a boolean `logits_to_keep`, flattened row-major)."""
        keep = inputs.get("logits_to_keep")
        if logits.dim() == 3:
            row_of = torch.arange(logits.shape[0]).repeat_interleave(logits.shape[1])
        else:
            row_of = torch.arange(keep.shape[0], device=keep.device)[:, None].expand(keep.shape)[keep].cpu()
        rows = rows[row_of]
        return self._alpha[rows].to(logits.device), self._probs[rows].to(logits.device)

    def describe(self) -> str:
        s = self.settings[0]
        return f"decoding-time experts: alpha {s.alpha:g}, rule {s.rule}"
