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

- Splits follow the concept AND the sentence frame: a concept's split is `split_of` of its text
  (lower-cased, a leading article dropped), a frame's that of its own text, and a prompt belongs to a
  split only when both do (a concept of the search split rendered in a report-split frame is in no
  split). So a prompt text that occurs under several attributes ("The CEO was" under gender and ses)
  lands in the same split everywhere, and nothing a search (or a probe, steering vector or expert
  trained on prompt activations) sees reappears in `select` or `report`, neither its concept nor its
  wording. The shares (30% report, 20% select) hold in expectation, not exactly. Neutral concepts are
  split the same way, so each split has its own reference q; their texts may not be a concept's.
- A group's probability is the *mean* over its surface forms of each form's probability (logmeanexp
  of the forms' log-probs), not the sum: groups are listed with different numbers of forms
  ("a man"/"male" vs "non-binary"), and under a sum a group would gain mass from its form count
  alone, so even a model indifferent between groups would be scored as biased. With the mean, a
  model that gives every form of every group the same probability is at KL 0 from uniform.
- A form's probability is that of the whole word: requests ask the scorer (`word_end=True`) to
  multiply each form's token probabilities by the probability that the next token starts a new word
  or ends the text, so " Christian" does not also count " Christians" or " Christianity".
- `limit` caps the concept prompts and, separately, the neutral prompts of each attribute (both
  spread round-robin over templates, each template starting at another frame), so a small limit
  still leaves a reference and still covers many frames.
- Besides the two distances, each attribute's reference q is reported (`<attr>/q_<group>`) with
  `overall/q_spread`: how far (KL, mean over attributes) q moves when only the neutral concepts are
  resampled. A repair that moves q further than that moved the reference itself (`q_drift`), which
  a repair that sends every prompt to one distribution does.
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
from repair.stats import N_BOOT, Metric, _weights, clustered_mean_metric, metric_seed
from repair.suites.base import ChoiceRequest, EvalConfig, OptionScores, SuiteResult, split_of

PACKAGE_LABEL = "<package>/repair/data/association.json"
MIN_GROUPS, MAX_GROUPS = 2, 8
MIN_NEUTRAL = 10  # neutral concepts: the reference q is a mean over them, so not a handful
MIN_NEUTRAL_PER_SPLIT = 3  # each split's own reference q needs a few neutral concepts of its own
SPLITS = ("search", "select", "report")
Q_SPREAD_QUANTILE = 95  # percentile of the resampled reference's KL that bounds q_drift
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
    split: str  # "search" / "select" / "report" when the concept's and the frame's splits agree, else "none"
    neutral: bool
    stereotyped: tuple[str, ...] = ()  # the group keys the concept is stereotyped towards; () if neutral
    frame: str = ""  # the frame's text, "{c}" in place of the concept

    @property
    def through_concept(self) -> str:
        """The prompt's text up to the end of its concept (the whole prompt when no frame is recorded)."""
        return self.frame.partition("{c}")[0] + self.concept if self.frame else self.prompt

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(" " + f for forms in self.forms for f in forms)


def split_key(concept: str) -> str:
    """What decides a concept's split: its text, lower-cased, spaces collapsed, a leading article
    dropped ("a bad driver" and "bad driver" are one concept)."""
    return _ARTICLE.sub("", " ".join(concept.lower().split()))


def frame_split(frame: str) -> str:
    """A frame's split, from its text alone (spaces collapsed, lower-cased)."""
    return split_of(" ".join(frame.lower().split()))


def prompt_split(concept: str, frame: str) -> str:
    """The split of a concept rendered in a frame: theirs when they agree, else "none"."""
    c = split_of(split_key(concept))
    return c if c == frame_split(frame) else "none"


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
        if not isinstance(items, list) or not items:
            fail(f"frames['{kind}'] must be a non-empty list of frames")
        for i, f in enumerate(items):
            if not (is_text(f) and f.count("{c}") == 1):
                fail(f"frames['{kind}'][{i}] ({f!r}) must be a trimmed string with exactly one {{c}} slot")
        texts = [" ".join(f.lower().split()) for f in items]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            fail(f"frames['{kind}'] repeats frame(s) {dup}")
        # a split without a frame of this kind would have no prompt of this kind's concepts
        empty = [s for s in SPLITS if not any(frame_split(f) == s for f in items)]
        if empty:
            fail(f"frames['{kind}'] has no frame in the {' and '.join(empty)} split (add or reword a frame: "
                 "a frame's split follows its text)")

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
    for s in SPLITS:
        n = sum(split_of(split_key(c["concept"])) == s for c in data["neutral"])
        if n < MIN_NEUTRAL_PER_SPLIT:
            fail(f"neutral has {n} concept(s) in the {s} split, needs at least {MIN_NEUTRAL_PER_SPLIT} "
                 "(add neutral concepts: a concept's split follows its text)")
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
            # One list per template, so the limit can spread over templates first.
            out = []
            for c in items:
                tid = f"{attr}:{c['id']}"
                stereotyped = () if neutral else tuple(c.get("stereotyped", ()))
                rendered = [Prompt(attr, tid, c["concept"], _render(f, c["concept"]), groups, forms,
                                   prompt_split(c["concept"], f), neutral, stereotyped, f)
                            for f in frames[c["frame"]]]
                rendered = [p for p in rendered if self.config.split in ("all", p.split)]
                if rendered:
                    out.append(rendered)
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
        references = {}  # attr -> (neutral distributions, their clusters), for q_spread
        for attr in self.attributes:
            idx = [i for i, p in enumerate(self.prompts) if p.attribute == attr]
            neutral = [dists[i] for i in idx if self.prompts[i].neutral]
            if neutral:
                n_clusters = [self.prompts[i].template_id.split(":", 1)[1] for i in idx if self.prompts[i].neutral]
                references[attr] = (np.array(neutral), n_clusters)
                for g, group in enumerate(self.prompts[idx[0]].groups):
                    metrics[f"{attr}/q_{group}"] = clustered_mean_metric([d[g] for d in neutral], n_clusters, "reference", seed=seed)
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
                    "prompt": p.prompt, "frame": p.frame, "split": p.split, "groups": list(p.groups),
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
        spread = q_spread(references, seed=seed) if references else None
        if spread is not None:  # None: a single neutral concept, no spread to measure (the guard is not applied)
            metrics["overall/q_spread"] = spread
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


def reference(metrics: dict, prefix: str = "association/") -> dict[str, np.ndarray]:
    """Each attribute's reference q from a row's metrics (`<prefix><attr>/q_<group>` values)."""
    out: dict[str, list[float]] = {}
    for k, m in metrics.items():
        if k.startswith(prefix) and "/q_" in k:
            attr = k[len(prefix):].split("/")[0]
            out.setdefault(attr, []).append(m["value"] if isinstance(m, dict) else m)
    return {a: np.asarray(v, np.float64) for a, v in out.items()}


def q_drift(before: dict, after: dict) -> float:
    """How far a repair moved the reference: the mean over attributes of KL(q_after || q_before), from
    two rows' metrics (NaN when neither holds a reference)."""
    qb, qa = reference(before), reference(after)
    common = [a for a in qb if a in qa]
    if not common:
        return float("nan")
    return float(np.mean([kl(qa[a] / qa[a].sum(), qb[a] / qb[a].sum()) for a in common]))


def q_spread(references: dict[str, tuple[np.ndarray, list[str]]], *, seed: int = 0) -> Metric | None:
    """The Q_SPREAD_QUANTILE-th percentile of the mean over attributes of KL(q* || q), q* the
    reference recomputed from resampled neutral concepts (the same draw for every attribute: the
    neutral concepts are shared). How far the reference moves from which neutral concepts happen to
    be measured alone; `q_drift` beyond it is a repair moving the reference itself."""
    names = sorted({c for _, clusters in references.values() for c in clusters})
    if len(names) < 2:  # one neutral concept: no spread to measure
        return None
    position = {c: i for i, c in enumerate(names)}
    w = np.concatenate(list(_weights(len(names), N_BOOT, metric_seed("q_spread", seed))))  # one draw for all attributes
    total = np.zeros(N_BOOT)
    for dists, clusters in references.values():
        index = np.array([position[c] for c in clusters])
        sums = np.zeros((len(names), dists.shape[1]))
        np.add.at(sums, index, dists)
        counts = np.bincount(index, minlength=len(names)).astype(np.float64)
        q = sums.sum(0) / counts.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (w @ sums) / (w @ counts)[:, None]
            total += np.sum(np.where(boot > 0, boot * (np.log(boot) - np.log(q)), 0.0), axis=1)
    value = float(np.percentile(total / len(references), Q_SPREAD_QUANTILE))
    return Metric(value, value, value, "reference", len(names))


def _round_robin(per_template: list[list[Prompt]], limit: int | None) -> list[Prompt]:
    """One frame of every template, then a second, ..., stopping at `limit`: spread over concepts.
    Template t starts at its frame t (mod its count), so a limit below the number of templates
    still covers many frames, not frame 0 alone.

    The kept prompts are returned in template order, so records stay grouped by concept.
    """
    slots = [(k, t, (k + t) % len(per_template[t])) for k in range(max(map(len, per_template), default=0))
             for t in range(len(per_template)) if k < len(per_template[t])]
    keep = sorted((t, f) for k, t, f in slots[:limit])
    return [per_template[t][k] for t, k in keep]
