"""The stereotype corpus: natural sentences that carry a stereotype, the decoding-time experts' training text.

The experts used to learn from the association suite's own prompts completed towards its own
reference q, so they learned the yardstick: every prompt moved to the model's default group, and in
wording they never saw the effect shrank. As the source methods do (DExperts trains on toxic and
non-toxic text, not on its benchmark), the experts now learn from text the yardstick does not
contain: `repair/data/corpus.json`, about 3,400 sentences written for this project, several per
association concept, in many sentence shapes with the group anywhere in the sentence.

- The anti-expert trains on the stereotyped version of each sentence (its own group).
- The expert trains on counterfactual versions: the group adjective swapped for another group of the
  attribute (counterfactual data augmentation). Both see the same words around the group, so their
  difference is the association. Which group replaces it is a rule (`COUNTERFACTUAL_RULES`):
  `matched` (the default) deals the anti-expert's own groups out again, no sentence keeping its own,
  so both experts name each group equally often and their difference carries no preference for a
  group on its own (which would move the neutral reference q: measured, README); `balanced` takes the
  other group used least so far, so the expert names every group about equally often.
- A sentence's split is its concept's (`split_of` of the concept's text, as in the association
  suite): the experts see search-split stereotypes only, never those the select and report splits
  measure.
- The corpus shares no sentence and no 6-word sequence with the pairs suite (`load` refuses one that
  does, naming it), which checks whether a repair transfers to whole sentences.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources

from repair.errors import DataError
from repair.suites.association import load_data as load_association
from repair.suites.association import split_key
from repair.suites.base import split_of
from repair.suites.pairs import load_pairs

NGRAM = 6  # no run of this many words may be shared with the pairs suite
COUNTERFACTUAL_RULES = ("matched", "balanced")
_WORD = re.compile(r"[a-z0-9']+")
_ARTICLE = re.compile(r"\b([Aa]) (?=[AEIOUaeiou])")


@dataclass(frozen=True)
class Sentence:
    attribute: str
    concept: str  # the association concept's id
    group: str  # the stereotyped group's key
    text: str  # with one "{g}" slot
    split: str

    def render(self, adjective: str) -> str:
        """The sentence with `adjective` in its slot ("a" before a vowel made "an", a first letter capitalised)."""
        out = _ARTICLE.sub(r"\1n ", self.text.replace("{g}", adjective))
        return out[0].upper() + out[1:]


def _package_file():
    return resources.files("repair") / "data" / "corpus.json"


def _data_path():
    """The file read: the embedded one (tests point it elsewhere)."""
    return _package_file()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _grams(text: str) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + NGRAM]) for i in range(len(w) - NGRAM + 1)}


def pairs_sentences() -> list[str]:
    """Every sentence of the pairs suite, both sides of each pair."""
    pairs, _ = load_pairs()
    return [p.prefix + side for p in pairs for side in (p.stereotyped, p.anti)]


class Corpus:
    """The validated corpus: `sentences` and each attribute's group adjectives (`groups`)."""

    def __init__(self, path=None):
        path = _data_path() if path is None else path
        self.label = "<package>/repair/data/corpus.json" if path == _package_file() else str(path)
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except OSError as e:
            raise DataError(self.label, f"cannot read: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(self.label, f"not UTF-8 JSON: {e}") from None
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.groups: dict[str, dict[str, str]] = {}
        self.sentences: list[Sentence] = []
        self._read(data)

    def _fail(self, problem: str):
        raise DataError(self.label, problem)

    def _read(self, data) -> None:
        association, _, _ = load_association()
        if not isinstance(data, dict) or not isinstance(data.get("attributes"), dict) or not data["attributes"]:
            self._fail("top level must be an object with a non-empty 'attributes' object")
        pair_texts = pairs_sentences()
        pair_grams = set().union(*map(_grams, pair_texts))
        pair_texts = {" ".join(_words(t)) for t in pair_texts}
        for attr, spec in data["attributes"].items():
            known = association["attributes"].get(attr)
            if known is None:
                self._fail(f"attribute {attr!r} is not one of association.json's ({', '.join(association['attributes'])})")
            groups = spec.get("groups") if isinstance(spec, dict) else None
            if not isinstance(groups, dict) or set(groups) != set(known["groups"]) \
                    or not all(isinstance(v, str) and v.strip() for v in groups.values()):
                self._fail(f"attributes.{attr}.groups must give an adjective for each of {', '.join(known['groups'])}")
            concepts = {c["id"]: c for c in known["concepts"]}
            seen = set()
            for i, s in enumerate(spec.get("sentences") or []):
                where = f"attributes.{attr}.sentences[{i}]"
                if not isinstance(s, dict) or set(s) != {"concept", "group", "text"} or not all(isinstance(v, str) for v in s.values()):
                    self._fail(f"{where} needs exactly the strings 'concept', 'group' and 'text'")
                concept = concepts.get(s["concept"])
                if concept is None:
                    self._fail(f"{where}: concept {s['concept']!r} is not a concept of {attr} in association.json")
                if s["group"] not in concept["stereotyped"]:
                    self._fail(f"{where}: group {s['group']!r} is not among {s['concept']!r}'s stereotyped groups {concept['stereotyped']}")
                if s["text"].count("{g}") != 1 or s["text"].strip() != s["text"]:
                    self._fail(f"{where} ({s['text']!r}): a trimmed sentence with exactly one {{g}} slot")
                if s["text"] in seen:
                    self._fail(f"{where} ({s['text']!r}) repeats an earlier sentence")
                seen.add(s["text"])
                sentence = Sentence(attr, s["concept"], s["group"], s["text"], split_of(split_key(concept["concept"])))
                for adjective in groups.values():
                    rendered = sentence.render(adjective)
                    shared = _grams(rendered) & pair_grams
                    if " ".join(_words(rendered)) in pair_texts or shared:
                        what = "is a sentence" if not shared else f"shares the words {' '.join(min(shared))!r} with a sentence"
                        self._fail(f"{where} ({s['text']!r}) {what} of the pairs suite, which must stay unseen "
                                   "(reword the sentence)")
                self.sentences.append(sentence)
            self.groups[attr] = dict(groups)

    def of_split(self, split: str) -> list[Sentence]:
        return [s for s in self.sentences if s.split == split]

    def training_text(self, split: str = "search", rule: str = "matched") -> dict[str, list[str]]:
        """{"anti_expert": stereotyped sentences, "expert": counterfactual ones} of `split`'s concepts:
        each sentence once with its own group and once with another of its attribute's groups, chosen
        by `rule` (module docstring)."""
        if rule not in COUNTERFACTUAL_RULES:
            raise ValueError(f"unknown counterfactual rule {rule!r} (choose from {', '.join(COUNTERFACTUAL_RULES)})")
        sentences = self.of_split(split)
        swapped = {}
        for attr, adjectives in self.groups.items():
            mine = [i for i, s in enumerate(sentences) if s.attribute == attr]
            chosen = _dealt([sentences[i].group for i in mine], list(adjectives), rule)
            swapped.update(zip(mine, chosen))
        return {"anti_expert": [s.render(self.groups[s.attribute][s.group]) for s in sentences],
                "expert": [s.render(self.groups[s.attribute][swapped[i]]) for i, s in enumerate(sentences)]}


def _dealt(own: list[str], groups: list[str], rule: str) -> list[str]:
    """Another group for each sentence. `matched`: the multiset `own` dealt out again, shifted past
    its largest group in sorted order so that no sentence keeps its own (possible while no group holds
    more than half; the rest take the least used other group); `balanced`: the least used other group."""
    out: list[str | None] = [None] * len(own)
    counts = dict.fromkeys(groups, 0)
    if rule == "matched" and own:
        order = sorted(range(len(own)), key=lambda i: (groups.index(own[i]), i))
        shift = max(own.count(g) for g in groups)
        for j, i in enumerate(order):
            other = own[order[(j + shift) % len(own)]]
            if other != own[i]:
                out[i] = other
                counts[other] += 1
    for i, g in enumerate(own):
        if out[i] is None:
            out[i] = min((h for h in groups if h != g), key=lambda h: counts[h])
            counts[out[i]] += 1
    return out
