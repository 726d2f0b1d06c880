"""FairSteer's labels, probes and vectors (repair.methods.fairsteer.steering) and its steering hook
(repair.methods.fairsteer.steerer) on hand-made data and a tiny random Llama: labels by hand, a probe
that finds the layer carrying the signal and not the noise, the hook's arithmetic against an
independent computation, per-row settings, the gate's exactness, KV-cache generation, bad settings."""
import numpy as np
import pytest
import torch

from repair.errors import UserError
from repair.methods.fairmed.probers import ProbeData
from repair.methods.fairsteer.steerer import SteerSetting as S, Steerer
from repair.methods.fairsteer.steering import Steering, fit, labels
from tiny import ByteTokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYERS, WIDTH = 3, 64


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def _data(dists, neutral, stereotyped, acts=None, concepts=None):
    n = len(dists)
    return ProbeData(np.zeros((n, 1, 2), np.float32) if acts is None else acts, ("gender",) * n,
                     tuple(concepts or [f"c{i}" for i in range(n)]), np.array(neutral),
                     tuple(np.array(d) for d in dists), {"gender": ("female", "male")}, tuple(stereotyped))


def test_labels_by_hand():
    # neutral prompts average to (0.4, 0.6); margin 0.05
    data = _data([[.3, .7], [.5, .5], [.5, .5], [.7, .3], [.2, .8], [.5, .5]],
                 [True, True, False, False, False, False],
                 [(), (), ("female",), ("female",), ("female",), ()])
    label, excess = labels(data, margin=0.05)
    # excess: .5-.4 = .1 (biased); .7-.4 = .3 (biased); .2-.4 = -.2 (unbiased); no stereotype: unlabelled
    assert label.tolist() == [-1, -1, 1, 1, 0, -1]
    np.testing.assert_allclose(excess[2:5], [0.1, 0.3, -0.2])
    assert labels(data, margin=0.2)[0].tolist() == [-1, -1, 0, 1, 0, -1]


def _synthetic(n_concepts=40, frames=4, seed=0):
    """Layer 1 carries the label along a fixed direction, layer 0 is noise; frames of a concept share
    a concept code in layer 0 (what a probe that is not cross-validated by concept would memorise)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.integers(0, 2, n_concepts), frames)
    n, d = len(y), 16
    acts = rng.normal(size=(n, 2, d)).astype(np.float32)
    acts[:, 0] += np.repeat(rng.normal(size=(n_concepts, d)) * 2, frames, axis=0)
    direction = np.zeros(d)
    direction[3] = 1.0
    acts[:, 1] += (2 * y[:, None] - 1) * 1.5 * direction
    concepts = [f"c{i // frames}" for i in range(n)]
    data = ProbeData(acts, ("gender",) * n, tuple(concepts), np.zeros(n, bool), tuple(np.array([.5, .5]) for _ in range(n)),
                     {"gender": ("female", "male")}, tuple(("female",) for _ in range(n)))
    return data, y


def test_probe_finds_the_signal_layer_and_the_vector_points_from_biased_to_unbiased():
    data, y = _synthetic()
    steering, scores = fit(data.activations, y, data.concepts, dims=None)
    acc = {s["layer"]: s["accuracy"] for s in scores}
    assert acc[1] > 0.85 and acc[0] < 0.7
    assert all(abs(s["majority"] - max(y.mean(), 1 - y.mean())) < 1e-9 for s in scores)
    # the collapsed probe on raw activations: biased rows (y = 1, +direction) score higher
    logit = data.activations[:, 1] @ steering.w[1].numpy() + steering.b[1].item()
    assert ((logit > 0) == y).mean() > 0.9
    # the vector is mean(unbiased) - mean(biased), unit length; the scale is the mean norm
    diff = data.activations[y == 0, 1].mean(0) - data.activations[y == 1, 1].mean(0)
    np.testing.assert_allclose(steering.direction[1].numpy(), diff / np.linalg.norm(diff), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(steering.scale[1].item(), np.linalg.norm(data.activations[:, 1], axis=-1).mean(), rtol=1e-5)
    assert scores[1]["vector_norm_ratio"] == pytest.approx(np.linalg.norm(diff) / steering.scale[1].item(), rel=1e-4)


def test_one_kind_of_label_is_a_user_error():
    data, y = _synthetic(n_concepts=6)
    with pytest.raises(UserError, match="needs both kinds"):
        fit(data.activations, np.zeros_like(y), data.concepts)


# ---- the hook ----------------------------------------------------------------------------------

def _steering(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(LAYERS, WIDTH, generator=g)
    direction /= direction.norm(dim=-1, keepdim=True)
    return Steering(torch.randn(LAYERS, WIDTH, generator=g) * 2, torch.zeros(LAYERS), direction,
                    torch.full((LAYERS,), scale))


class _Capture:
    """Each decoder layer's output before the steering hook (a hook put first) and after it."""

    def __init__(self, model):
        self.pre, self.post, self.handles = {}, {}, []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self.pre.__setitem__(i, _out(o).clone()), prepend=True))

    def after(self, model):
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self.post.__setitem__(i, _out(o).clone())))
        return self

    def remove(self):
        for h in self.handles:
            h.remove()


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _ids(batch=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 257, (batch, length), generator=g)
    ids[:, 0] = 257
    return ids


def test_hook_adds_the_vector_exactly_where_the_probe_fires(model):
    steering, ids = _steering(), _ids()
    cap = _Capture(model)
    hook = Steerer(model, steering, [S(1, 0.4, 0.5)])
    cap.after(model)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
        cap.remove()
    x = cap.pre[1].double()
    p = torch.sigmoid(x @ steering.w[1].double() + steering.b[1].double())
    fires = p > 0.5
    assert 0 < fires.float().mean() < 1  # the gate is doing something on these inputs
    expected = torch.where(fires[..., None], x + 0.4 * steering.scale[1].double() * steering.direction[1].double(), x)
    torch.testing.assert_close(cap.post[1].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(cap.post[1][~fires], cap.pre[1][~fires])  # exactly unchanged where it does not fire
    assert torch.equal(cap.post[0], cap.pre[0])  # other layers untouched


def test_always_on_steers_every_position_and_alpha_zero_changes_nothing(model):
    steering, ids = _steering(), _ids(batch=1)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    with Steerer(model, steering, [S(2, 0.0, None)]), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
    cap = _Capture(model)
    hook = Steerer(model, steering, [S(2, 0.3, None)])
    cap.after(model)
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    cap.remove()
    push = 0.3 * steering.scale[2] * steering.direction[2]
    torch.testing.assert_close(cap.post[2], cap.pre[2] + push, rtol=1e-5, atol=1e-6)


def test_per_row_settings_equal_separate_forwards_and_remove_restores(model):
    steering, ids = _steering(seed=1), _ids(batch=2)
    settings = [S(), S(0, 0.5, 0.3), S(2, 0.2, None)]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        separate = []
        for s in settings:
            with Steerer(model, steering, [s]):
                separate.append(model(input_ids=ids).logits)
        with Steerer(model, steering, settings) as hook:
            hook.set_rows([0, 0, 1, 1, 2, 2])
            together = model(input_ids=ids.repeat(3, 1)).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(together, torch.cat(separate), rtol=1e-5, atol=1e-5)
    assert torch.equal(separate[0], base) and not torch.allclose(separate[1], base)
    assert torch.equal(after, base)


def test_generate_with_and_without_cache_agree(model):
    tok = ByteTokenizer(add_bos=True)
    ids = torch.tensor([tok("The doctor said that").input_ids])

    def gen(cache, batch=ids):
        with torch.no_grad():
            return model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                  max_new_tokens=8, use_cache=cache, pad_token_id=0)[:, ids.shape[1]:]

    base = gen(True)
    strong = S(1, 3.0, 0.2)
    with Steerer(model, _steering(), [strong]):
        cached, uncached = gen(True), gen(False)
    assert torch.equal(cached, uncached) and not torch.equal(cached, base)
    with Steerer(model, _steering(), [S(), strong]) as hook:
        hook.set_rows([0, 1])
        both = gen(True, ids.repeat(2, 1))
    assert torch.equal(both[0], base[0]) and torch.equal(both[1], cached[0])


@pytest.mark.parametrize("setting, message", [
    (S(3, 0.1, 0.5), "layer 3 is out of range"),
    (S(0, -0.1, 0.5), "alpha must be 0 or more"),
    (S(0, 0.1, 1.5), r"threshold must lie in \[0, 1\]"),
])
def test_bad_settings_are_refused(model, setting, message):
    with pytest.raises(ValueError, match=message):
        Steerer(model, _steering(), [setting])


def test_vectors_of_another_width_are_refused(model):
    s = _steering()
    narrow = Steering(s.w[:, :32], s.b, s.direction[:, :32], s.scale)
    with pytest.raises(ValueError, match="width 32"):
        Steerer(model, narrow)


def test_extremes_vector_is_between_the_least_and_most_skewed_prompts():
    data, y = _synthetic()
    excess = np.linspace(-1, 1, len(y))  # hand-made: the first quarter lowest, the last quarter highest
    steering, _ = fit(data.activations, y, data.concepts, dims=None, excess=excess, extremes=0.25)
    n = len(y)
    low, high = excess <= np.quantile(excess, 0.25), excess >= np.quantile(excess, 0.75)
    assert low.sum() == high.sum() == n // 4
    diff = data.activations[low, 0].mean(0) - data.activations[high, 0].mean(0)
    np.testing.assert_allclose(steering.direction[0].numpy(), diff / np.linalg.norm(diff), rtol=1e-5, atol=1e-6)


def _bbq_item(label, biased, unknown=2):
    from repair.suites.bbq import BBQItem

    return BBQItem(1, "Age", "1", "ambig", "neg", "ctx", "q?", ("a", "b", "c"), label, unknown, biased, biased, "search")


@pytest.mark.parametrize("scores, item, expected", [
    ([0.0, -1.0, -2.0], _bbq_item(label=0, biased=1), 0),   # picks the correct answer: unbiased
    ([-1.0, 0.0, -2.0], _bbq_item(label=2, biased=1), 1),   # picks the stereotyped wrong answer: biased
    ([0.0, -1.0, -2.0], _bbq_item(label=2, biased=1), -1),  # another wrong answer: unlabelled
    ([-1.0, 0.0, -2.0], _bbq_item(label=1, biased=1), 0),   # the stereotyped answer is correct here: unbiased
    ([-1.0, 0.0, -2.0], _bbq_item(label=2, biased=None), -1),  # no known stereotyped answer: unlabelled
])
def test_bbq_labels_by_hand(scores, item, expected):
    from repair.methods.fairsteer.steering import bbq_label

    assert bbq_label(item, np.array(scores)) == expected


def test_bbq_examples_label_search_split_items_by_template(model, shared_data, monkeypatch):
    """On BBQ data: only search-split items, at most BBQ_PER_CATEGORY per category, concepts are templates,
    and each label follows the model's own pick (recomputed here from its scores)."""
    from types import SimpleNamespace

    from repair.methods.fairsteer import steering
    from repair.evaluator import Evaluator
    from repair.suites.base import EvalConfig
    from repair.suites.bbq import cloze_request, load_items
    from tiny import ByteTokenizer

    monkeypatch.setattr(steering, "BBQ_PER_CATEGORY", 3)
    loaded = SimpleNamespace(model=model, tokenizer=ByteTokenizer(add_bos=True))
    config = EvalConfig(data_dir=shared_data, split="search")
    acts, label, concepts = steering.bbq_examples(loaded, config, progress=False)
    items, _ = load_items(EvalConfig(data_dir=shared_data, split="search", limit=3))
    assert acts.shape == (len(items), LAYERS, WIDTH) and len(items) <= 3 * 11
    assert all(it.split == "search" for it in items) and list(concepts) == [it.template for it in items]
    scores = Evaluator(model, loaded.tokenizer, progress=False).score_choices([cloze_request(it) for it in items])
    for it, s, got in zip(items, scores, label):
        pick = int(np.argmax(s.mean_logprob))
        assert got == (0 if pick == it.label else 1 if pick == it.biased_index else -1)
