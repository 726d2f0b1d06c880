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
may still sample with `top_p`, applied after this processor).

One class serves both places a model's next-token distribution is read:
- the evaluator (`Evaluator(..., transform=...)`): the target's and the experts' forwards run once
  per batch, and every setting (alpha, rule) of the batch is combined from those logits, so a whole
  alpha grid costs three forwards;
- `generate()`, as a `transformers.LogitsProcessor`: each expert keeps its own KV cache across
  decoding steps (a step feeds the experts only the new token), with the attention mask and position
  ids the target uses (left padding included). When the ids a step sees do not extend the ones the
  caches hold (a new generate call, beams reordered), the caches restart from the full ids.
alpha 0 returns the target's logits untouched, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor

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
    diff = torch.where(probs[:, None], torch.softmax(expert.float(), -1) - torch.softmax(anti.float(), -1),
                       expert.float() - anti.float())
    return torch.where((alpha == 0)[:, None], target32, target32 + alpha[:, None].to(target32) * diff)


def vocab_problem(target, experts: Sequence, names: Sequence[str] = ("the expert", "the anti-expert")) -> str | None:
    """Why `experts` cannot shift `target`'s logits (a different output vocabulary), or None."""
    want = target.get_output_embeddings().weight.shape[0]
    for name, m in zip(names, experts):
        got = m.get_output_embeddings().weight.shape[0]
        if got != want:
            return f"{name} has {got} output tokens but the target has {want}"
    return None


def _cache_argument(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ExpertsTransform(PerRowHooks, LogitsProcessor):
    """The experts' shift of a target model's next-token logits, one setting per batch row.

        transform = ExpertsTransform(target, expert, anti, [ExpertSetting(1.5)])
        transform.attach()              # target.generate(...) now applies it
        Evaluator(target, tok, transform=transform)     # every suite scores the combined distribution
    """

    transforms_outputs = True  # read by the evaluator and the scorer: not a forward hook

    def __init__(self, target, expert, anti_expert, settings: Sequence[ExpertSetting] = (ExpertSetting(),), *,
                 cache: bool = True):
        problem = vocab_problem(target, (expert, anti_expert))
        if problem:
            raise ValueError(problem)
        self.target, self.models, self.cache = target, (expert, anti_expert), cache
        self._handles = []
        self._generate = None
        self.set_variants(settings)
        self.begin()

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
        self._rows = None

    def active(self, variants) -> bool:
        """Whether any of `variants` changes the logits (else the experts need not run)."""
        return bool((self._alpha[torch.as_tensor(list(variants), dtype=torch.long)] != 0).any())

    def apply(self, target: torch.Tensor, experts: tuple[torch.Tensor, torch.Tensor], variant: int) -> torch.Tensor:
        """Logits [N, V] under setting `variant`, from the target's and the experts' logits at the same positions."""
        if float(self._alpha[variant]) == 0:
            return target
        n, dev = target.shape[0], target.device
        return combine(target, *experts, self._alpha[variant].expand(n).to(dev), self._probs[variant].expand(n).to(dev))

    # ---- generate() -------------------------------------------------------------------------
    def begin(self, attention_mask: torch.Tensor | None = None) -> None:
        """Start a generation whose prompt rows have `attention_mask` (None: no padding); drop the caches."""
        self._mask = attention_mask
        self._ids = None
        self._caches = [None, None]

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = self._row_ids(input_ids.shape[0])
        alpha = self._alpha[rows].to(scores.device)
        if not (alpha != 0).any():
            return scores
        expert, anti = self._next_logits(input_ids)
        return combine(scores, expert, anti, alpha, self._probs[rows].to(scores.device)).to(scores.dtype)

    def _attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt's mask followed by ones for every generated token (what generate() gives the target)."""
        batch, length = input_ids.shape
        mask = self._mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] > length:
            return torch.ones_like(input_ids)
        mask = mask.to(input_ids.device)
        return torch.cat([mask, mask.new_ones(batch, length - mask.shape[1])], dim=1)

    def _next_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        mask = self._attention_mask(input_ids)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        held = self._ids
        resume = (self.cache and held is not None and held.shape[0] == input_ids.shape[0]
                  and held.shape[1] < input_ids.shape[1] and torch.equal(input_ids[:, :held.shape[1]], held))
        start = held.shape[1] if resume else 0
        out = []
        for k, model in enumerate(self.models):
            cache_arg = _cache_argument(model)  # transformers 5.24 renamed past_key_values to cache
            result = model(input_ids=input_ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
                           use_cache=self.cache, logits_to_keep=1, **{cache_arg: self._caches[k] if resume else None})
            self._caches[k] = getattr(result, cache_arg, None) if self.cache else None
            out.append(result.logits[:, -1].float())
        self._ids = input_ids.clone() if self.cache else None
        return out

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The combined logits at every position of `input_ids` under setting 0, from plain forwards:
        the reference the exported bundle's reload check compares."""
        z = [m(input_ids=input_ids).logits for m in (self.target, *self.models)]
        flat = [t.reshape(-1, t.shape[-1]) for t in z]
        return self.apply(flat[0].float(), (flat[1], flat[2]), 0).reshape(z[0].shape)

    # ---- attached to a model ----------------------------------------------------------------
    def attach(self) -> "ExpertsTransform":
        """Make `target.generate()` apply this transform (before any processor the caller passes);
        `remove()` restores the target's own generate."""
        from transformers import LogitsProcessorList

        if self._generate is not None:
            return self
        original = self.target.generate

        def generate(*args, logits_processor=None, attention_mask=None, **kwargs):
            self.begin(attention_mask)
            processors = LogitsProcessorList([self, *(logits_processor or [])])
            try:
                return original(*args, attention_mask=attention_mask, logits_processor=processors, **kwargs)
            finally:
                self.begin()  # free the experts' caches

        self.target.generate = generate
        self._generate = original
        return self

    def remove(self) -> None:
        if self._generate is not None:
            del self.target.generate  # the instance attribute: the class's generate shows again
            self._generate = None
        self.begin()

    def describe(self) -> str:
        s = self.settings[0]
        return f"decoding-time experts: alpha {s.alpha:g}, rule {s.rule}"
