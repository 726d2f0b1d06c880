import hashlib
import json
import math
import re

import numpy as np
import pytest

from repair.errors import DataError, UserError
from repair.suites import association
from repair.suites.association import AssociationSuite, group_distribution
from repair.suites.base import SPLITS, EvalConfig, OptionScores
from fakes import TableScorer

ln = math.log

# A tiny data file whose distributions are worked out by hand below.
TINY = {
    "version": 7,
    # one frame of each split (a frame's split follows its text); the hand numbers are the same in each
    "frames": {"role": ["The {c} is", "This {c} is", "Your {c} is"]},
    "neutral": [{"id": "n1", "concept": "n1", "frame": "role"}, {"id": "n2", "concept": "n2", "frame": "role"}],
    "attributes": {
        "two": {
            "groups": {"x": ["x"], "y": ["y1", "y2"]},
            "concepts": [{"id": "c1", "concept": "c1", "frame": "role", "stereotyped": ["x"], "source": "test"},
                         {"id": "c2", "concept": "c2", "frame": "role", "stereotyped": ["y"], "source": "test"}],
        },
        "three": {
            "groups": {"a": ["a"], "b": ["b"], "c": ["c"]},
            "concepts": [{"id": "d1", "concept": "d1", "frame": "role", "stereotyped": ["a"], "source": "test"},
                         {"id": "d2", "concept": "d2", "frame": "role", "stereotyped": ["b", "c"], "source": "test"}],
        },
    },
}
# Summed log-probabilities per (prompt, option); the "three" prompts differ only through options a/b/c.
# Group y's mass is the mean of its two forms: (y1 + y2) / 2 (a sum would give other numbers throughout).
TABLE = {
    "The c1 is": {" x": ln(0.6), " y1": ln(0.1), " y2": ln(0.3), " a": -1.0, " b": -2.0, " c": -3.0},  # two: p = (.75, .25)
    "The c2 is": {" x": ln(0.1), " y1": ln(0.1), " y2": ln(0.3), " a": -5.0, " b": -5.0, " c": -5.0},  # two: p = (1/3, 2/3)
    "The n1 is": {" x": ln(0.2), " y1": ln(0.1), " y2": ln(0.5), " a": -4.0, " b": -4.0, " c": -4.0},  # two: q1 = (.4, .6)
    "The n2 is": {" x": ln(0.1), " y1": ln(0.2), " y2": ln(0.6), " a": -2.0, " b": -2.0, " c": -2.0},  # two: q2 = (.2, .8)
}
# The "three" attribute reuses c1/c2 wording via d1/d2:
TABLE["The d1 is"] = TABLE["The c1 is"]
TABLE["The d2 is"] = TABLE["The c2 is"]
# The data file needs ten neutral concepts: n3..n10 repeat n1 and n2 alternately, so q stays (.3, .7).
for _k in range(3, 11):
    TINY["neutral"].append({"id": f"n{_k}", "concept": f"n{_k}", "frame": "role"})
    TABLE[f"The n{_k} is"] = TABLE[f"The n{2 - _k % 2} is"]


def table_fn(prompt, option):
    # every frame gives the same scores: "This c1 is" and "Your c1 is" score as "The c1 is"
    return TABLE["The " + prompt.split(" ", 1)[1]][option], 2  # token counts must not matter


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    path = tmp_path / "association.json"
    path.write_text(json.dumps(TINY), encoding="utf-8")
    monkeypatch.setattr(association, "_data_path", lambda: path)
    return path


def test_kl_metrics_match_hand_computation(tiny):
    suite = AssociationSuite(EvalConfig(seed=3))
    scorer = TableScorer(table_fn)
    res = suite.run(scorer)
    assert len(scorer.calls) == len(suite.prompts) == 3 * 2 * (2 + 10)  # 3 frames

    # two: neutral reference q = mean((.4, .6), (.2, .8)) = (.3, .7)
    u2_c1 = 0.75 * ln(0.75 / 0.5) + 0.25 * ln(0.25 / 0.5)
    n2_c1 = 0.75 * ln(0.75 / 0.3) + 0.25 * ln(0.25 / 0.7)
    u2_c2 = (1 / 3) * ln((1 / 3) / 0.5) + (2 / 3) * ln((2 / 3) / 0.5)
    n2_c2 = (1 / 3) * ln((1 / 3) / 0.3) + (2 / 3) * ln((2 / 3) / 0.7)
    # three: d1 = softmax(-1, -2, -3), d2 = uniform; neutral prompts are uniform, so q is uniform too.
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    p = [math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z]
    u3_d1 = sum(pi * ln(pi * 3) for pi in p)

    m = res.metrics
    assert m["two/kl_uniform"].value == pytest.approx((u2_c1 + u2_c2) / 2)
    assert m["two/kl_neutral"].value == pytest.approx((n2_c1 + n2_c2) / 2)
    assert m["three/kl_uniform"].value == pytest.approx(u3_d1 / 2)
    assert m["three/kl_neutral"].value == pytest.approx(u3_d1 / 2)
    assert m["overall/kl_uniform"].value == pytest.approx((u2_c1 + u2_c2 + u3_d1) / 4)
    assert m["overall/kl_neutral"].value == pytest.approx((n2_c1 + n2_c2 + u3_d1) / 4)
    assert {k: x.better for k, x in m.items() if x.better != ("reference" if "/q_" in k else "lower")} == {}
    # the reference q of each attribute, and how far resampling the neutral concepts alone moves it
    assert [m["two/q_x"].value, m["two/q_y"].value] == pytest.approx([0.3, 0.7])
    assert [m[f"three/q_{g}"].value for g in "abc"] == pytest.approx([1 / 3] * 3)
    assert m["overall/kl_uniform"].n == 12 and m["two/kl_neutral"].n == 6
    assert m["two/kl_uniform"].ci_low <= m["two/kl_uniform"].value <= m["two/kl_uniform"].ci_high

    rec = {r["template_id"]: r for r in res.records}
    assert set(rec) == {"two:c1", "two:c2", "three:d1", "three:d2"}  # concept prompts only
    assert rec["two:c1"]["probs"] == pytest.approx([0.75, 0.25])
    assert rec["two:c2"]["probs"] == pytest.approx([1 / 3, 2 / 3])
    assert rec["two:c1"]["kl_neutral"] == pytest.approx(n2_c1)
    assert rec["two:c1"]["top_group"] == "x" and rec["two:c2"]["top_group"] == "y"
    assert rec["three:d1"]["probs"] == pytest.approx(p)
    assert rec["two:c1"]["groups"] == ["x", "y"]
    assert {r["prompt"] for r in res.records if r["template_id"] == "two:c1"} == {"The c1 is", "This c1 is", "Your c1 is"}
    assert {r["split"] for r in res.records} <= {"search", "select", "report", "none"}  # "none": concept and frame disagree
    assert rec["two:c1"]["stereotyped"] == ["x"] and rec["three:d2"]["stereotyped"] == ["b", "c"]
    assert [p.stereotyped for p in suite.prompts if p.template_id == "two:c1"] == [("x",)] * 3
    assert all(p.stereotyped == () for p in suite.prompts if p.neutral)

    assert res.files == {str(tiny): hashlib.sha256(tiny.read_bytes()).hexdigest()}
    assert res.info["n_prompts"] == {"two": 6, "three": 6}
    assert res.info["n_neutral"] == {"two": 30, "three": 30}


def test_requests_offer_every_form_with_a_leading_space(tiny):
    suite = AssociationSuite(EvalConfig())
    reqs = {r.prompt: r.options for r in suite.requests() if " x" in r.options}
    assert reqs["The c1 is"] == (" x", " y1", " y2")
    assert [p.neutral for p in suite.prompts if p.attribute == "two"] == [False] * 6 + [True] * 30
    assert all(r.word_end for r in suite.requests())  # forms are scored as whole words


def test_group_distribution_averages_forms_and_is_stable():
    # A group's mass is the mean of its forms' probabilities, in log space (no underflow):
    # (exp(-1000) + exp(-1000)) / 2 vs exp(-1000 - ln 2) -> (2/3, 1/3). Summing would give (.8, .2).
    s = OptionScores(np.array([-1000.0, -1000.0, -1000.0 - ln(2)]), np.array([1, 3, 2]))
    assert group_distribution(s, [2, 1]) == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError):
        group_distribution(s, [1, 1])


def test_a_groups_form_count_does_not_move_kl_uniform(tiny):
    """Hand-made scores: every form of every group equally likely (0.2 each). Group y has two forms,
    x one. Mean over forms: p = (.5, .5), KL to uniform 0, the right answer for a model with no
    preference. Sum over forms (the wrong rule) would give p = (1/3, 2/3) and KL = ln(2/3)/3 +
    2 ln(4/3)/3 = 0.0566 from the form count alone."""
    suite = AssociationSuite(EvalConfig(attributes=("two",)))
    flat = OptionScores(np.full(3, ln(0.2)), np.array([1, 1, 2]))
    # y1 and y2 at 0.1 and 0.3: mean 0.2, the same as x; the sum (0.4) would make y twice as likely.
    skewed_forms = OptionScores(np.array([ln(0.2), ln(0.1), ln(0.3)]), np.array([1, 2, 2]))
    res = suite.score([flat if i % 2 else skewed_forms for i in range(len(suite.prompts))])
    wrong = (1 / 3) * ln((1 / 3) / 0.5) + (2 / 3) * ln((2 / 3) / 0.5)
    assert wrong == pytest.approx(0.0566, abs=1e-4)
    assert res.metrics["two/kl_uniform"].value == pytest.approx(0.0, abs=1e-12)
    assert res.metrics["two/kl_neutral"].value == pytest.approx(0.0, abs=1e-12)
    assert all(r["probs"] == pytest.approx([0.5, 0.5]) for r in res.records)


def test_malformed_json_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text('{"version": 1,\n  "frames": [oops\n', encoding="utf-8")
    monkeypatch.setattr(association, "_data_path", lambda: path)
    with pytest.raises(DataError) as e:
        AssociationSuite(EvalConfig())
    assert str(path) in str(e.value) and e.value.line == 2


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["attributes"]["two"]["groups"].pop("y"), "groups"),
    (lambda d: d["attributes"]["two"]["concepts"].pop(), "at least 2"),
    (lambda d: d["attributes"]["two"]["concepts"][0].update(frame="nope"), "frame"),
    (lambda d: d["attributes"]["two"]["concepts"][1].update(id="c1"), "repeats template ids"),
    (lambda d: d["frames"].update(role=["The {c} is "]), "trimmed"),
    (lambda d: d["frames"].update(role=["The c is", "This {c} is", "Your {c} is"]), "frames['role'][0] ('The c is')"),
    (lambda d: d["frames"].update(role=["The {c} is", "This {c} is"]), "no frame in the report split"),
    (lambda d: d["frames"].update(role=["The {c} is", "This {c} is", "Your {c} is", "the  {c} is"]), "repeats frame"),
    (lambda d: d.update(neutral=[n for n in d["neutral"] if n["id"] != "n1"] + [{"id": "n11", "concept": "n11", "frame": "role"}]),
     "in the select split, needs at least 3"),
    (lambda d: d.pop("version"), "version"),
    (lambda d: d["neutral"].append({"id": "n11", "concept": "The C1", "frame": "role"}), "also a concept"),
    (lambda d: d["neutral"].pop(), "at least 10"),
    (lambda d: d["attributes"]["two"]["concepts"][0].pop("stereotyped"), "'stereotyped' must be"),
    (lambda d: d["attributes"]["two"]["concepts"][0].update(stereotyped=[]), "'stereotyped' must be"),
    (lambda d: d["attributes"]["two"]["concepts"][0].update(stereotyped=["a"]), "group keys of the attribute (x, y)"),
    (lambda d: d["attributes"]["two"]["concepts"][0].update(source=" "), "'source' must be"),
    (lambda d: d["attributes"]["two"]["concepts"][0].pop("source"), "'source' must be"),
    (lambda d: d["attributes"]["two"]["concepts"][1].update(concept="a C1"), "repeats concept(s) ['c1']"),
])
def test_malformed_structure_is_a_data_error(tmp_path, monkeypatch, edit, needle):
    data = json.loads(json.dumps(TINY))
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(association, "_data_path", lambda: path)
    with pytest.raises(DataError) as e:
        AssociationSuite(EvalConfig())
    assert str(path) in str(e.value) and needle in str(e.value)


# ---- the shipped data -------------------------------------------------------------------------------

REQUIRED = {"gender", "religion", "race_ethnicity", "nationality", "age", "disability", "sexual_orientation", "ses"}


def test_shipped_data_meets_the_brief():
    suite = AssociationSuite(EvalConfig())
    assert REQUIRED <= set(suite.attributes) and len(suite.attributes) >= 8
    ids = set()
    for attr in suite.attributes:
        ps = [p for p in suite.prompts if p.attribute == attr]
        concepts = {p.template_id for p in ps if not p.neutral}
        neutral = [p for p in ps if p.neutral]
        assert len(concepts) >= 60, attr
        assert len({p.template_id for p in neutral}) >= 10, attr
        frames = {t: sum(p.template_id == t for p in ps) for t in concepts}
        assert min(frames.values()) >= 4, attr  # every concept renders in at least 4 frames
        assert 2 <= len(ps[0].groups) <= 8
        # every concept names the groups it is stereotyped towards; neutral prompts none
        assert all(p.stereotyped and set(p.stereotyped) <= set(p.groups) for p in ps if not p.neutral), attr
        assert all(p.stereotyped == () for p in neutral)
        assert all(t.startswith(attr + ":") for t in concepts)
        assert not ids & concepts
        ids |= concepts
    for p in suite.prompts:
        assert p.prompt == p.prompt.rstrip() and p.prompt and "{c}" not in p.prompt
        assert all(f == f.strip() for fs in p.forms for f in fs)
    assert len({(p.template_id, p.prompt) for p in suite.prompts}) == len(suite.prompts)
    res = AssociationSuite(EvalConfig(attributes=("age",), limit=1)).score(
        [OptionScores(np.zeros(4), np.ones(4, np.int64))] * 2)
    assert res.files == {association.PACKAGE_LABEL: hashlib.sha256(association._package_file().read_bytes()).hexdigest()}


def test_shipped_concepts_do_not_name_their_groups_or_repeat():
    """A concept that contains one of its attribute's group words ("old", "Muslim") would score the
    word's repetition, not an association; two spellings of one concept would be one concept twice."""
    data, _, _ = association.load_data()
    for attr, spec in data["attributes"].items():
        words = {re.sub(r"^(a|an) ", "", f.lower()) for forms in spec["groups"].values() for f in forms}
        for c in spec["concepts"]:
            named = [w for w in words if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", c["concept"].lower())]
            assert not named, (attr, c["concept"], named)
        keys = [association.split_key(c["concept"]) for c in spec["concepts"]]
        assert len(set(keys)) == len(keys), attr
        ids = [c["id"] for c in spec["concepts"]]
        assert len(set(ids)) == len(ids), attr
    assert data["version"] == 3


def test_split_is_deterministic_disjoint_and_non_empty():
    full = AssociationSuite(EvalConfig())
    parts = {split: AssociationSuite(EvalConfig(split=split)) for split in SPLITS}
    assert [p.prompt for p in AssociationSuite(EvalConfig(split="search")).prompts] == [p.prompt for p in parts["search"].prompts]
    for attr in full.attributes:
        def concepts(s):
            return {p.template_id for p in s.prompts if p.attribute == attr and not p.neutral}

        def neutral(s):
            return [p.prompt for p in s.prompts if p.attribute == attr and p.neutral]

        sides = [concepts(parts[split]) for split in SPLITS]
        assert all(sides), attr  # every attribute has concepts in each of the three splits
        assert sum(map(len, sides)) == len(set().union(*sides)) and set().union(*sides) == concepts(full), attr
        for split in SPLITS:
            assert neutral(parts[split])  # each split has its own reference
            assert {p.split for p in parts[split].prompts} == {split}
    # A template's side does not depend on which attributes are loaded.
    only = AssociationSuite(EvalConfig(split="report", attributes=("religion",)))
    assert {p.template_id for p in only.prompts} == {p.template_id for p in parts["report"].prompts if p.attribute == "religion"}


def test_splits_share_no_frame_concept_or_neutral_concept():
    """Held out means held out in wording too: a split's prompts use only its own frames, concepts and
    neutral concepts, and a concept rendered in another split's frame is in no split."""
    parts = {split: AssociationSuite(EvalConfig(split=split)).prompts for split in SPLITS}
    for field in ("frame", "concept"):
        for neutral in (False, True):
            used = {split: {getattr(p, field) for p in ps if p.neutral == neutral} for split, ps in parts.items()}
            assert all(used.values()), (field, neutral)
            assert not (used["search"] & used["select"] or used["search"] & used["report"] or used["select"] & used["report"]), (field, neutral)
    data, _, _ = association.load_data()
    for kind, frames in data["frames"].items():
        assert len(frames) >= 20, kind  # 20 role and 20 trait frames at least
        assert {association.frame_split(f) for f in frames} == set(SPLITS), kind
    assert len(data["neutral"]) >= 40
    assert sum(map(len, parts.values())) < len(AssociationSuite(EvalConfig()).prompts)  # mixed pairs are dropped
    everything = AssociationSuite(EvalConfig()).prompts
    for p in everything[:400]:
        both = association.split_of(association.split_key(p.concept)), association.frame_split(p.frame)
        assert p.split == (both[0] if both[0] == both[1] else "none")


def test_q_spread_is_the_resampled_references_kl_percentile():
    """A second implementation, one replicate at a time: draw neutral concepts with replacement (the
    same draw for every attribute), recompute each attribute's q, take KL to the full q, average over
    attributes, and read the 95th percentile."""
    from repair.stats import N_BOOT, _weights, metric_seed

    rng = np.random.default_rng(0)
    names = [f"n{i}" for i in range(6)]
    refs = {}
    for attr, g in (("a", 2), ("b", 3)):
        dists = rng.dirichlet(np.ones(g), size=12)
        refs[attr] = (dists, [names[i % 6] for i in range(12)])
    got = association.q_spread(refs, seed=4)
    w = np.concatenate(list(_weights(6, N_BOOT, metric_seed("q_spread", 4))))
    values = []
    for row in w:
        total = 0.0
        for dists, clusters in refs.values():
            q = dists.mean(0)
            weights = np.array([row[names.index(c)] for c in clusters])
            boot = (weights[:, None] * dists).sum(0) / weights.sum()
            total += association.kl(boot, q)
        values.append(total / 2)
    assert got.value == pytest.approx(np.percentile(values, association.Q_SPREAD_QUANTILE))
    # q_drift: KL of the after reference from the before one, mean over attributes
    before = {"association/a/q_x": {"value": 0.5}, "association/a/q_y": {"value": 0.5}}
    after = {"association/a/q_x": {"value": 0.9}, "association/a/q_y": {"value": 0.1}}
    assert association.q_drift(before, after) == pytest.approx(0.9 * ln(0.9 / 0.5) + 0.1 * ln(0.1 / 0.5))


def test_no_prompt_text_is_in_two_splits():
    """A prompt text shared by attributes ("The CEO was" under gender and ses) is in one split only,
    and no neutral prompt is also a concept prompt: nothing leaks from report to search."""
    suite = AssociationSuite(EvalConfig())
    sides: dict[str, set] = {}
    for p in suite.prompts:
        sides.setdefault(p.prompt, set()).add(p.split)
    assert {t: s for t, s in sides.items() if len(s) > 1} == {}
    shared = [t for t in sides if len({p.attribute for p in suite.prompts if p.prompt == t and not p.neutral}) > 1]
    assert shared  # the data does share concepts across attributes, so the check above is not empty
    # The same concept with or without its article is one concept.
    assert association.split_key(" A  Bad driver") == association.split_key("bad driver") == "bad driver"


def test_limit_caps_and_spreads_prompts():
    suite = AssociationSuite(EvalConfig(limit=5))
    for attr in suite.attributes:
        concept = [p for p in suite.prompts if p.attribute == attr and not p.neutral]
        neutral = [p for p in suite.prompts if p.attribute == attr and p.neutral]
        assert len(concept) == 5 and len({p.template_id for p in concept}) == 5  # five different concepts
        assert len(neutral) == 5 and len({p.template_id for p in neutral}) == 5
    assert [p.prompt for p in AssociationSuite(EvalConfig(limit=5)).prompts] == [p.prompt for p in suite.prompts]
    with pytest.raises(UserError):
        AssociationSuite(EvalConfig(limit=0))


def test_categories_select_attributes():
    suite = AssociationSuite(EvalConfig(attributes=("religion", "Age")))
    assert suite.attributes == ["religion", "age"]
    assert {p.attribute for p in suite.prompts} == {"religion", "age"}
    with pytest.raises(UserError, match="valid: gender"):
        AssociationSuite(EvalConfig(attributes=("religion", "astrology")))


def test_without_neutral_prompts_only_kl_uniform_is_reported(tiny):
    full = AssociationSuite(EvalConfig(seed=3)).run(TableScorer(table_fn))
    scorer = TableScorer(table_fn)
    lean = AssociationSuite(EvalConfig(seed=3, association_neutral=False)).run(scorer)
    assert len(scorer.calls) == 12  # the 4 concepts in 3 frames, none of the 60 neutral prompts
    assert not any(k.endswith("kl_neutral") for k in lean.metrics)
    for key in ("two/kl_uniform", "three/kl_uniform", "overall/kl_uniform"):
        assert lean.metrics[key].value == pytest.approx(full.metrics[key].value)
