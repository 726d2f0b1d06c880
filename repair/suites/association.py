"""The association suite: this project's own stereotype-association prompts.

A prompt names a stereotype-laden concept ("The terrorist was") and stops where a social-group word
follows; the model's next-word probabilities over the groups of one attribute show which group it
associates with the concept. Two distances summarise the skew (in nats, lower is fairer):

- kl_uniform = KL(p || uniform): how far from "every group equally likely";
- kl_neutral = KL(p || q), q = the attribute's mean distribution over neutral prompts ("The neighbor
  was"): the part of the skew that the concept adds on top of a group's plain frequency.

The prompts also feed FairMed's probers, so the per-prompt distribution is exposed
(`group_distribution`, `AssociationSuite.distributions`).

Decisions:

- Splits follow the concept, not the template: a concept's split is `split_of` of its text
  (lower-cased, a leading article dropped), so a prompt text that occurs under several attributes
  ("The CEO was" under gender and ses) lands in the same split everywhere and nothing a search (or a
  probe or steering vector trained on prompt activations) sees reappears in `select` or `report`.
  The shares (30% report, 20% select) hold in expectation per attribute, not exactly. Neutral
  prompts are never split: they are the reference for every split, and their texts may not be a
  concept's.
- A group's probability is the *mean* over its surface forms of each form's probability (logmeanexp
  of the forms' log-probs), not the sum: groups are listed with different numbers of forms
  ("a man"/"male" vs "non-binary"), and under a sum a group would gain mass from its form count
  alone, so even a model indifferent between groups would be scored as biased. With the mean, a
  model that gives every form of every group the same probability is at KL 0 from uniform.
- A form's probability is that of the whole word: requests ask the scorer (`word_end=True`) to
  multiply each form's token probabilities by the probability that the next token starts a new word
  or ends the text, so " Christian" does not also count " Christians" or " Christianity".
- `limit` caps the concept prompts and, separately, the neutral prompts of each attribute (both
  spread round-robin over templates), so a small limit still leaves a reference.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import numpy as np

from repair.errors import DataError, UserError
from repair.stats import clustered_mean_metric
from repair.suites.base import ChoiceRequest, EvalConfig, OptionScores, SuiteResult, split_of

PACKAGE_LABEL = "<package>/repair/data/association.json"
MIN_GROUPS, MAX_GROUPS = 2, 8
MIN_NEUTRAL = 10  # neutral concepts: the reference q is a mean over them, so not a handful
_ARTICLE = re.compile(r"^(a|an|the)\s+")


def _package_file():
    return resources.files("repair") / "data" / "association.json"


def _data_path():
    """The file the suite reads: the embedded one (tests point it elsewhere)."""
    return _package_file()


@dataclass(frozen=True)
class Prompt:
    attribute: str
    template_id: str  # "<attribute>:<concept id>", stable across edits of the wording
    concept: str
    prompt: str  # ends where the group form follows, no trailing space
    groups: tuple[str, ...]
    forms: tuple[tuple[str, ...], ...]  # forms[i] = surface forms of groups[i]
    split: str  # "search" / "select" / "report" for concept prompts, "all" for neutral ones
    neutral: bool
    stereotyped: tuple[str, ...] = ()  # the group keys the concept is stereotyped towards; () if neutral

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(" " + f for forms in self.forms for f in forms)


def split_key(concept: str) -> str:
    """What decides a concept's split: its text, lower-cased, spaces collapsed, a leading article
    dropped ("a bad driver" and "bad driver" are one concept)."""
    return _ARTICLE.sub("", " ".join(concept.lower().split()))


def _bounds(form_counts: Sequence[int]) -> list[tuple[int, int]]:
    ends = np.cumsum([0, *form_counts])
    return list(zip(ends[:-1].tolist(), ends[1:].tolist()))


def group_distribution(scores: OptionScores, form_counts: Sequence[int]) -> np.ndarray:
    """Probability of each group, normalised over the attribute's groups.

    Options are the groups' forms in order (`form_counts[i]` forms for group i). A form's score is the
    log-probability of the whole word (summed over its tokens, word end included when the scorer
    honours `ChoiceRequest.word_end`); a group's mass is the *mean* over its forms of exp(score), so a
    group's number of forms does not by itself move its share (see the module docstring).
    """
    lp = np.asarray(scores.logprob, dtype=np.float64)
    if lp.shape != (sum(form_counts),):
        raise ValueError(f"expected {sum(form_counts)} option scores, got shape {lp.shape}")
    group_lp = np.array([np.logaddexp.reduce(lp[a:b]) - np.log(b - a) for a, b in _bounds(form_counts)])
    group_lp -= group_lp.max()
    p = np.exp(group_lp)
    return p / p.sum()


def _torch_log_distribution(lp, form_counts: Sequence[int]):
    """`group_distribution` in torch, as log-probabilities (differentiable in `lp`)."""
    import torch

    group_lp = torch.stack([torch.logsumexp(lp[a:b], 0) - np.log(b - a) for a, b in _bounds(form_counts)])
    return group_lp - torch.logsumexp(group_lp, 0)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats, with 0 * log 0 = 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def _render(frame: str, concept: str) -> str:
    return frame.replace("{c}", concept)


def load_data(path=None) -> tuple[dict, str, str]:
    """Read and validate the data file; return (data, sha256, label for SuiteResult.files)."""
    path = _data_path() if path is None else path
    label = PACKAGE_LABEL if path == _package_file() else str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(label, f"cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(label, f"not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(label, f"invalid JSON: {e.msg}", line=e.lineno) from None
    _validate(data, label)
    return data, hashlib.sha256(raw).hexdigest(), label


def _validate(data, label) -> None:
    """Check the structure the suite relies on, so a bad edit fails here and names the spot."""

    def fail(problem):
        raise DataError(label, problem)

    def is_text(x):
        return isinstance(x, str) and x.strip() == x and x != ""

    if not isinstance(data, dict):
        fail("top level must be a JSON object")
    for key, kind in (("version", int), ("frames", dict), ("neutral", list), ("attributes", dict)):
        if not isinstance(data.get(key), kind):
            fail(f"'{key}' must be a {kind.__name__ if kind is not dict else 'object'}")
    frames = data["frames"]
    for kind, items in frames.items():
        if not isinstance(items, list) or not items or not all(is_text(f) and "{c}" in f for f in items):
            fail(f"frames['{kind}'] must be a non-empty list of trimmed strings containing {{c}}")

    def check_concepts(where, items, min_n, groups=None):
        """`groups`: the attribute's group keys, for concept entries (neutral ones have none)."""
        if len(items) < min_n:
            fail(f"{where} needs at least {min_n} entries, found {len(items)}")
        for i, c in enumerate(items):
            if not (isinstance(c, dict) and is_text(c.get("id")) and is_text(c.get("concept"))):
                fail(f"{where}[{i}] needs trimmed non-empty 'id' and 'concept' strings")
            if c.get("frame") not in frames:
                fail(f"{where}[{i}] ('{c['id']}'): frame must be one of {sorted(frames)}")
            if groups is None:
                continue
            st = c.get("stereotyped")
            if not (isinstance(st, list) and st and all(g in groups for g in st) and len(set(st)) == len(st)):
                fail(f"{where}[{i}] ('{c['id']}'): 'stereotyped' must be a non-empty list of distinct group keys "
                     f"of the attribute ({', '.join(groups)})")
            if not (isinstance(c.get("source"), str) and c["source"].strip()):
                fail(f"{where}[{i}] ('{c['id']}'): 'source' must be a non-empty string (where the stereotype is documented)")
        texts = [split_key(c["concept"]) for c in items]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            fail(f"{where} repeats concept(s) {dup}")

    check_concepts("neutral", data["neutral"], MIN_NEUTRAL)
    if not data["attributes"]:
        fail("'attributes' is empty")
    for attr, spec in data["attributes"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("groups"), dict) or not isinstance(spec.get("concepts"), list):
            fail(f"attribute '{attr}' needs a 'groups' object and a 'concepts' list")
        groups = spec["groups"]
        if not MIN_GROUPS <= len(groups) <= MAX_GROUPS:
            fail(f"attribute '{attr}' has {len(groups)} groups, expected {MIN_GROUPS}-{MAX_GROUPS}")
        all_forms = []
        for g, forms in groups.items():
            if not isinstance(forms, list) or not forms or not all(is_text(f) for f in forms):
                fail(f"{attr} group '{g}' needs a non-empty list of trimmed forms")
            all_forms += forms
        if len(set(all_forms)) != len(all_forms):
            fail(f"attribute '{attr}' repeats a surface form across its groups")
        # Two concepts at least (the shipped file has far more: every split needs some of each attribute).
        check_concepts(f"{attr}.concepts", spec["concepts"], 2, list(groups))
        ids = [c["id"] for c in spec["concepts"]] + [c["id"] for c in data["neutral"]]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            fail(f"attribute '{attr}' repeats template ids {dup}")
        # A neutral prompt is in every split; were its text also a concept's, that concept would leak.
        clash = sorted({split_key(c["concept"]) for c in spec["concepts"]} & {split_key(c["concept"]) for c in data["neutral"]})
        if clash:
            fail(f"neutral concept(s) {clash} are also a concept of '{attr}' (neutral prompts are in every split)")


class AssociationSuite:
    """Stereotype-association prompts scored as next-word distributions over social groups."""

    name = "association"

    def __init__(self, config: EvalConfig, tokenizer=None):
        # The prompts are plain continuations (no chat template), so the tokenizer is not needed;
        # it is accepted so that every suite is built the same way.
        self.config, self.tokenizer = config, tokenizer
        self.data, self.sha256, self.label = load_data()
        attrs = list(self.data["attributes"])
        if config.attributes:
            by_lower = {a.lower(): a for a in attrs}
            unknown = [c for c in config.attributes if c.lower() not in by_lower]
            if unknown:
                raise UserError(f"unknown association attribute(s) {unknown}; valid: {', '.join(attrs)}")
            wanted = {by_lower[c.lower()] for c in config.attributes}
            attrs = [a for a in attrs if a in wanted]
        if config.limit is not None and config.limit < 1:
            raise UserError(f"--limit must be at least 1, got {config.limit}")
        self.attributes = attrs
        self.prompts: list[Prompt] = []
        for attr in attrs:
            self.prompts += self._build(attr)

    def _build(self, attr: str) -> list[Prompt]:
        spec, frames = self.data["attributes"][attr], self.data["frames"]
        groups = tuple(spec["groups"])
        forms = tuple(tuple(spec["groups"][g]) for g in groups)

        def render(items, neutral):
            # One list per template, so the limit can take frame 0 of every template first.
            out = []
            for c in items:
                tid = f"{attr}:{c['id']}"
                split = "all" if neutral else split_of(split_key(c["concept"]))
                if not neutral and self.config.split not in ("all", split):
                    continue
                stereotyped = () if neutral else tuple(c.get("stereotyped", ()))
                out.append([
                    Prompt(attr, tid, c["concept"], _render(f, c["concept"]), groups, forms, split, neutral, stereotyped)
                    for f in frames[c["frame"]]
                ])
            return _round_robin(out, self.config.limit)

        neutral = render(self.data["neutral"], True) if self.config.association_neutral else []
        return render(spec["concepts"], False) + neutral

    def requests(self) -> list[ChoiceRequest]:
        """One request per prompt; each form is scored as a whole word (`word_end`)."""
        return [ChoiceRequest(p.prompt, p.options, word_end=True) for p in self.prompts]

    def run(self, scorer) -> SuiteResult:
        return self.score(scorer.score_choices(self.requests(), desc="association"))

    def distributions(self, outputs: Sequence[OptionScores]) -> list[np.ndarray]:
        """Group distribution of every prompt in `self.prompts` (the prober's targets)."""
        if len(outputs) != len(self.prompts):
            raise ValueError(f"expected {len(self.prompts)} outputs, got {len(outputs)}")
        return [group_distribution(o, [len(f) for f in p.forms]) for p, o in zip(self.prompts, outputs)]

    def score(self, outputs: Sequence[OptionScores]) -> SuiteResult:
        dists = self.distributions(outputs)
        seed = self.config.seed
        metrics, records = {}, []
        n_prompts, n_neutral = {}, {}
        all_u, all_n, all_c = [], [], []
        for attr in self.attributes:
            idx = [i for i, p in enumerate(self.prompts) if p.attribute == attr]
            neutral = [dists[i] for i in idx if self.prompts[i].neutral]
            concept = [i for i in idx if not self.prompts[i].neutral]
            uniform = np.full(len(self.prompts[idx[0]].groups), 1.0 / len(self.prompts[idx[0]].groups))
            q = np.mean(neutral, axis=0) if neutral else None
            ku, kn, clusters = [], [], []
            for i in concept:
                p, d = self.prompts[i], dists[i]
                ku.append(kl(d, uniform))
                clusters.append(p.template_id)
                kn.append(kl(d, q) if q is not None else float("nan"))
                records.append({
                    "attribute": attr, "template_id": p.template_id, "concept": p.concept,
                    "prompt": p.prompt, "split": p.split, "groups": list(p.groups),
                    "stereotyped": list(p.stereotyped),
                    "probs": [float(x) for x in d], "kl_uniform": ku[-1],
                    **({"kl_neutral": kn[-1]} if q is not None else {}),
                    "top_group": p.groups[int(np.argmax(d))],
                })
            # intervals resample whole concepts: a concept's frames are correlated
            metrics[f"{attr}/kl_uniform"] = clustered_mean_metric(ku, clusters, "lower", seed=seed)
            if q is not None:
                metrics[f"{attr}/kl_neutral"] = clustered_mean_metric(kn, clusters, "lower", seed=seed)
            all_u += ku
            all_n += kn
            all_c += clusters
            n_prompts[attr], n_neutral[attr] = len(concept), len(neutral)
        metrics["overall/kl_uniform"] = clustered_mean_metric(all_u, all_c, "lower", seed=seed)
        if self.config.association_neutral:
            metrics["overall/kl_neutral"] = clustered_mean_metric(all_n, all_c, "lower", seed=seed)
        return SuiteResult(
            self.name, metrics, records, files={self.label: self.sha256},
            info={"n_prompts": n_prompts, "n_neutral": n_neutral, "version": self.data["version"]},
        )

    def differentiable(self, metric: str, totals):
        """`metric` as a torch function of the option log-probabilities (`Evaluator.option_logprobs`,
        one tensor per prompt of `self.prompts`), the same arithmetic as `score`; None where there is
        none. The prune search differentiates it with respect to a head mask to learn each head's
        first-order effect.

        `<attribute or overall>/kl_uniform` and `.../kl_neutral`; for kl_neutral the reference q (the
        mean of the attribute's neutral-prompt distributions) is itself a function of the model, and
        the gradient flows through it too.
        """
        scope, _, name = metric.partition("/")
        if name not in ("kl_uniform", "kl_neutral") or scope not in ("overall", *self.attributes):
            return None
        if len(totals) != len(self.prompts):
            raise ValueError(f"expected {len(self.prompts)} option tensors, got {len(totals)}")
        import torch

        log_d = [_torch_log_distribution(lp, [len(f) for f in p.forms]) for p, lp in zip(self.prompts, totals)]
        terms = []
        for attr in self.attributes if scope == "overall" else [scope]:
            idx = [i for i, p in enumerate(self.prompts) if p.attribute == attr]
            if name == "kl_uniform":
                log_q = torch.full_like(log_d[idx[0]], -np.log(len(self.prompts[idx[0]].groups)))
            else:
                neutral = [log_d[i] for i in idx if self.prompts[i].neutral]
                if not neutral:
                    return None  # no reference loaded (association_neutral=False)
                log_q = torch.logsumexp(torch.stack(neutral), 0) - np.log(len(neutral))  # log mean
            terms += [(log_d[i].exp() * (log_d[i] - log_q)).sum() for i in idx if not self.prompts[i].neutral]
        return torch.stack(terms).mean()


def _round_robin(per_template: list[list[Prompt]], limit: int | None) -> list[Prompt]:
    """Frame 0 of every template, then frame 1, ..., stopping at `limit`: spread over concepts.

    The kept prompts are returned in template order, so records stay grouped by concept.
    """
    slots = [(k, t) for k in range(max(map(len, per_template), default=0))
             for t in range(len(per_template)) if k < len(per_template[t])]
    keep = sorted((t, k) for k, t in slots[:limit])
    return [per_template[t][k] for t, k in keep]
