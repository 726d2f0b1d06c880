"""Decoding-time experts: the combination formula against a hand computation, the evaluator's shared
forwards, generation with the experts' KV caches against uncached generation and against a hand-run
greedy decode, alpha 0 as the unrepaired model bit for bit, the training text and the training."""
import numpy as np
import pytest
import torch

from repair.evaluator import Evaluator
from repair.methods.experts.space import EXPERT_ALPHAS, ExpertSpace
from repair.methods.experts.transform import ExpertSetting, ExpertsTransform, vocab_problem
from repair.suites.base import ChoiceRequest
from tiny import ByteTokenizer, tiny_llama

REQUESTS = [ChoiceRequest("The nurse was", (" a man", " a woman", " x")),
            ChoiceRequest("Everyone knew the CEO was", (" female", " male"), word_end=True)]
SETTINGS = [ExpertSetting(0.0), ExpertSetting(1.5), ExpertSetting(0.5), ExpertSetting(6.0, "probs")]


@pytest.fixture(scope="module")
def trio():
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)


def _hand_logprobs(trio, ids: list[int], setting: ExpertSetting) -> torch.Tensor:
    """log-softmax of the combined logits at every position, from three plain forwards, in float64."""
    with torch.no_grad():
        zt, ze, za = (m(torch.tensor([ids])).logits[0].double() for m in trio)
    diff = ze - za if setting.rule == "logits" else ze.softmax(-1) - za.softmax(-1)
    return torch.log_softmax(zt + setting.alpha * diff, -1)


def _hand_option(trio, tok, prompt: str, option: str, setting: ExpertSetting, word_end: bool) -> float:
    from repair.evaluator import word_start_mask

    n = len(tok(prompt, add_special_tokens=False).input_ids)
    ids = tok(prompt + option, add_special_tokens=False).input_ids
    if word_end:
        ids = ids + [0]  # a placeholder: only the position after the option is read
    lp = _hand_logprobs(trio, ids, setting)
    total = sum(float(lp[p - 1, ids[p]]) for p in range(n, len(ids) - word_end))
    if word_end:
        total += float(torch.logsumexp(lp[len(ids) - 2][word_start_mask(tok, lp.shape[1])], 0))
    return total


@pytest.mark.parametrize("vocab_rows", [64, 2])  # 2: every batch's positions read in many slices
def test_scores_are_the_formula_applied_by_hand_for_every_variant_of_one_shared_forward(trio, one_torch_thread, vocab_rows, monkeypatch):
    monkeypatch.setattr("repair.evaluator.VOCAB_ROWS", vocab_rows)
    tok = ByteTokenizer()
    transform = ExpertsTransform(*trio, SETTINGS)
    got = Evaluator(trio[0], tok, transform=transform, progress=False).score_choices_variants(REQUESTS, len(SETTINGS))
    for v, s in enumerate(SETTINGS):
        for i, r in enumerate(REQUESTS):
            want = [_hand_option(trio, tok, r.prompt, o, s, r.word_end) for o in r.options]
            np.testing.assert_allclose(got[v][i].logprob, want, rtol=0, atol=2e-4)


@pytest.mark.parametrize("vocab_rows", [64, 2])  # 2: every batch's positions read in many slices
def test_perplexity_variants_are_the_formula_applied_by_hand(trio, one_torch_thread, vocab_rows, monkeypatch):
    monkeypatch.setattr("repair.evaluator.VOCAB_ROWS", vocab_rows)
    ids = list(range(3, 40))
    transform = ExpertsTransform(*trio, SETTINGS)
    nll = Evaluator(trio[0], ByteTokenizer(), transform=transform, progress=False).token_nll_variants(ids, 40, 40, len(SETTINGS))
    for v, s in enumerate(SETTINGS):
        lp = _hand_logprobs(trio, ids, s)
        want = [-float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
        np.testing.assert_allclose(nll[v], want, rtol=0, atol=2e-4)


def test_log_probability_combination_is_the_logits_rule_after_softmax(trio):
    """Why there is no third rule: log p_t + a (log p_e - log p_a) differs from z_t + a (z_e - z_a) by a
    constant per position."""
    with torch.no_grad():
        zt, ze, za = (m(torch.tensor([[5, 9, 77, 3]])).logits[0].double() for m in trio)
    a = 1.7
    by_logits = torch.log_softmax(zt + a * (ze - za), -1)
    lsm = lambda z: torch.log_softmax(z, -1)  # noqa: E731
    by_logprobs = torch.log_softmax(lsm(zt) + a * (lsm(ze) - lsm(za)), -1)
    torch.testing.assert_close(by_logits, by_logprobs, rtol=0, atol=1e-10)


def test_alpha_zero_is_the_unrepaired_model_exactly_and_runs_no_expert(trio, one_torch_thread):
    tok = ByteTokenizer()
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in trio[1:]]
    try:
        transform = ExpertsTransform(*trio, [ExpertSetting(0.0), ExpertSetting(0.0, "probs")])
        shifted = Evaluator(trio[0], tok, transform=transform, progress=False)
        calls.clear()
        got = shifted.score_choices_variants(REQUESTS, 2)
        nll = shifted.token_nll_variants(list(range(3, 30)), 16, 8, 2)
        assert not calls
    finally:
        for h in handles:
            h.remove()
    plain = Evaluator(trio[0], tok, progress=False)
    for v in range(2):
        for g, w in zip(got[v], plain.score_choices(REQUESTS)):
            assert np.array_equal(g.logprob, w.logprob)
        assert np.array_equal(nll[v], plain.token_nll(list(range(3, 30)), 16, 8))


def test_variants_share_the_target_forward(trio, one_torch_thread):
    """Four settings cost the forwards of one: the target runs as often as for a single variant."""
    calls = []
    handle = trio[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        ev = Evaluator(trio[0], ByteTokenizer(), transform=ExpertsTransform(*trio, SETTINGS), progress=False)
        calls.clear()
        ev.score_choices_variants(REQUESTS, len(SETTINGS))
        shared = len(calls)
        calls.clear()
        ev.transform.set_variants([ExpertSetting(1.0)])
        ev.score_choices_variants(REQUESTS, 1)
        assert shared == len(calls) == 1
    finally:
        handle.remove()


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=12, pad_token_id=0, **kw)


PROMPTS = {"input_ids": torch.tensor([[0, 0, 0, 84, 105, 33], [84, 104, 101, 32, 110, 117]]),
           "attention_mask": torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}


@pytest.mark.parametrize("setting", [ExpertSetting(1.5), ExpertSetting(8.0, "probs")])
def test_cached_generation_equals_uncached_generation_token_for_token(trio, setting, one_torch_thread):
    out = {}
    transform = ExpertsTransform(*trio, [setting]).attach()
    try:
        for cache in (True, False):
            greedy = _generate(trio[0], PROMPTS, do_sample=False, use_cache=cache)
            torch.manual_seed(11)
            sampled = _generate(trio[0], PROMPTS, do_sample=True, top_k=20, use_cache=cache)
            out[cache] = (greedy, sampled)
    finally:
        transform.remove()
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert not torch.equal(out[True][0], _generate(trio[0], PROMPTS, do_sample=False))  # the experts did change it


def test_greedy_generation_follows_the_combined_logits_computed_by_hand(trio, one_torch_thread):
    setting = ExpertSetting(2.0)
    ids = [84, 104, 101]
    transform = ExpertsTransform(*trio, [setting]).attach()
    try:
        got = _generate(trio[0], {"input_ids": torch.tensor([ids])}, do_sample=False)[0].tolist()
    finally:
        transform.remove()
    for _ in range(12):
        ids.append(int(_hand_logprobs(trio, ids, setting)[-1].argmax()))
    assert got == ids


def test_alpha_zero_generation_is_the_unrepaired_generation(trio, one_torch_thread):
    plain = _generate(trio[0], PROMPTS, do_sample=False)
    transform = ExpertsTransform(*trio, [ExpertSetting(0.0)]).attach()
    try:
        assert torch.equal(_generate(trio[0], PROMPTS, do_sample=False), plain)
    finally:
        transform.remove()
    assert not trio[0]._forward_hooks  # remove() left the model's forward as it was


def test_experts_with_another_vocabulary_are_refused(trio):
    other = tiny_llama(3, vocab_size=300)
    assert vocab_problem(trio[0], (trio[1], other)) == "the anti-expert has 300 output tokens but the target has 260"
    with pytest.raises(ValueError, match="300 output tokens"):
        ExpertsTransform(trio[0], other, trio[2])
    with pytest.raises(ValueError, match="alpha must be 0 or more"):
        ExpertsTransform(*trio, [ExpertSetting(-1.0)])


def test_space_keys_round_trip_and_cover_the_grid():
    space = ExpertSpace()
    keys = space.enumerate()
    assert len(keys) == sum(map(len, EXPERT_ALPHAS.values())) == len(set(keys))
    for k in keys:
        s = space.config(k)
        assert space.key(None, (s.rule, s.alpha)) == k and s.alpha in EXPERT_ALPHAS[s.rule]
    assert space.key(None, ("logits", 0.0)) == "base" and space.config("base") == ExpertSetting()


# ---- the experts' text and training -------------------------------------------------------------

def test_training_text_is_the_corpus_of_search_split_stereotypes_with_counterfactuals():
    """The experts learn from the stereotype corpus, not from the association prompts: search-split
    concepts only; the anti-expert's sentence carries its stereotyped group, the expert's the same
    words with another group (rule `balanced`: every group about equally often); no prompt of any
    split is in it."""
    from collections import Counter

    from repair.methods.experts.corpus import Corpus
    from repair.methods.experts.training import ROLES, training_text
    from repair.suites.association import AssociationSuite, split_key
    from repair.suites.base import EvalConfig, split_of

    corpus = Corpus()
    assert len(corpus.sentences) >= 3000
    text = training_text(corpus, "balanced")
    search = corpus.of_split("search")
    assert len(text["expert"]) == len(text["anti_expert"]) == len(search)
    data = AssociationSuite(EvalConfig(attributes=("age",), limit=1)).data["attributes"]
    for s in search:  # the split is the concept's, computed here from association.json's own text
        concept = next(c for c in data[s.attribute]["concepts"] if c["id"] == s.concept)
        assert split_of(split_key(concept["concept"])) == "search"
    prompts = {p.prompt for p in AssociationSuite(EvalConfig()).prompts}
    for role in ROLES:
        sentences = [a + b for a, b in text[role]]
        assert not any(p in t for t in sentences[:300] for p in prompts if len(p) > 40)
    gender = corpus.groups["gender"]
    expert_groups = Counter()
    for s, (a1, b1), (a2, b2) in zip(search, text["anti_expert"], text["expert"]):
        anti, expert = a1 + b1, a2 + b2
        assert anti == s.render(corpus.groups[s.attribute][s.group])
        assert expert != anti and len(expert.split()) == len(anti.split()) or s.attribute != "gender"
        if s.attribute == "gender":
            used = [g for g, adj in gender.items() if expert == s.render(adj)]
            assert used and used[0] != s.group
            expert_groups[used[0]] += 1
    counts = sorted(expert_groups.values())
    # balanced as far as the sentences allow: a group appears only in sentences stereotyping another one
    # (about 50 of the search split's gender sentences stereotype women, so "male" can be used at most that often)
    assert len(counts) == 3 and counts[-1] - counts[0] <= 0.25 * counts[-1]


def test_matched_counterfactuals_name_each_group_as_often_as_the_anti_expert_does():
    """Rule `matched`: the expert's groups are the anti-expert's dealt out again, no sentence keeping
    its own, so the two name each group equally often (but where one group holds over half of an
    attribute's sentences: gender's male, 94 of 179; the rest take the least used other group)."""
    from collections import Counter

    from repair.methods.experts.corpus import Corpus

    corpus = Corpus()
    search = corpus.of_split("search")
    text = corpus.training_text("search", "matched")
    assert text["anti_expert"] == corpus.training_text("search", "balanced")["anti_expert"]
    for attr, adjectives in corpus.groups.items():
        idx = [i for i, s in enumerate(search) if s.attribute == attr]
        expert = [next(g for g, adj in adjectives.items() if text["expert"][i] == search[i].render(adj)) for i in idx]
        own = [search[i].group for i in idx]
        assert all(e != o for e, o in zip(expert, own)), attr
        largest = max(Counter(own).values())
        if largest <= len(own) / 2:
            assert Counter(expert) == Counter(own), attr
        else:
            assert sum((Counter(own) - Counter(expert)).values()) <= 2 * largest - len(own), attr
    with pytest.raises(ValueError, match="unknown counterfactual rule"):
        corpus.training_text("search", "uniform")


def test_corpus_shares_no_six_words_with_pairs_and_refuses_one_that_does(tmp_path, monkeypatch):
    """Checked here with a second implementation (plain string search over every rendering), and a
    corpus holding a pairs sentence is refused at load, naming the entry."""
    import json
    import re

    from repair.methods.experts import corpus as corpus_module
    from repair.errors import DataError
    from repair.suites.pairs import load_pairs

    pairs, _ = load_pairs()
    pair_text = " | ".join(" ".join(re.findall(r"[a-z0-9']+", (p.prefix + side).lower())) for p in pairs
                           for side in (p.stereotyped, p.anti))
    corpus = corpus_module.Corpus()
    for s in corpus.sentences[::7]:
        for adjective in corpus.groups[s.attribute].values():
            words = re.findall(r"[a-z0-9']+", s.render(adjective).lower())
            for i in range(len(words) - 5):
                assert " ".join(words[i:i + 6]) not in pair_text, s.text
    data = json.loads(corpus_module._package_file().read_text())
    taken = pairs[0]
    template = (taken.prefix + taken.stereotyped).replace(" " + taken.stereotyped.split()[0], " {g}", 1)
    data["attributes"][taken.attribute]["sentences"].insert(0, {**data["attributes"][taken.attribute]["sentences"][0], "text": template})
    bad = tmp_path / "corpus.json"
    bad.write_text(json.dumps(data))
    monkeypatch.setattr(corpus_module, "_data_path", lambda: bad)
    with pytest.raises(DataError, match=r"sentences\[0\].*pairs suite"):
        corpus_module.Corpus()


def test_fine_tuning_trains_only_the_top_layers_and_lowers_the_loss(one_torch_thread):
    import copy

    from repair.methods.experts.training import TrainConfig, fine_tune

    model = tiny_llama(4)
    before = copy.deepcopy(model)
    pairs = [("The nurse was", " a woman."), ("The pilot was", " a man.")] * 16
    losses = fine_tune(model, ByteTokenizer(), pairs, TrainConfig(layers=1, epochs=10, lr=1e-2, batch=8), "test")
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5  # nats per completion token
    changed = {n for (n, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    assert changed and all(n.startswith("model.layers.2.") for n in changed)


@pytest.mark.parametrize("vocab_rows", [64, 2])  # 2: every batch's positions read in many slices
def test_a_batch_mixing_forwards_scores_each_variant_as_by_hand(trio, one_torch_thread, vocab_rows, monkeypatch):
    monkeypatch.setattr("repair.evaluator.VOCAB_ROWS", vocab_rows)
    """Rows of two forwards in one batch (a head mask and none), each read with and without the
    experts: a stack's rows (mask + experts) and the experts' rows get the formula on their own
    forward's logits, the experts running once per distinct text, and no variant reads another's rows."""
    from repair.methods.prune.heads import HeadMasker, head_layout

    tok = ByteTokenizer()
    target = trio[0]
    n_layers, n_heads, _ = head_layout(target)
    mask = np.ones((n_layers, n_heads), dtype=np.float32)
    mask[0, 1] = mask[1, 0] = 0
    variants = [(None, ExpertSetting(0.0)), (mask, ExpertSetting(0.0)), (None, ExpertSetting(1.5)),
                (mask, ExpertSetting(1.5)), (None, ExpertSetting(6.0, "probs"))]
    masker = HeadMasker(target, np.stack([np.ones_like(mask) if m is None else m for m, _ in variants]))
    transform = ExpertsTransform(*trio, [s for _, s in variants])
    transform.forward_of = [0, 1, 0, 1, 0]
    evaluator = Evaluator(target, tok, transform=transform, progress=False, on_rows=masker.set_rows)
    calls = []  # rows of each expert forward
    hooks = [e.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
             for e in trio[1:]]
    try:
        got = evaluator.score_choices_variants(REQUESTS, len(variants))
    finally:
        for h in hooks:
            h.remove()
        masker.remove()
    assert calls and sum(calls) == 2 * len(REQUESTS)  # each expert once per text, not per forward sharing it
    for v, (m, s) in enumerate(variants):
        single = HeadMasker(target, (np.ones_like(mask) if m is None else m)[None])
        try:
            for i, r in enumerate(REQUESTS):
                want = [_hand_option(trio, tok, r.prompt, o, s, r.word_end) for o in r.options]
                np.testing.assert_allclose(got[v][i].logprob, want, rtol=0, atol=2e-4)
        finally:
            single.remove()
