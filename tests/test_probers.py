"""FairMed's probers: the exact KL gradient, cross-validation grouped by concept (a signal is found, noise
and per-concept codes are not mistaken for one), the collapsed affine map, the gate calibration, the file
round trip, and the activations `collect` reads from a model."""
import hashlib

import numpy as np
import pytest
import torch

from repair.methods.fairmed import probers as P
from repair.methods.fairmed.probers import GATE_QUANTILES, TARGETS, ProbeData, Probers, collect, fit
from tiny import ByteTokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GROUPS = {"gender": ("f", "m"), "race": ("a", "b", "c")}
D, L = 16, 3


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _segment_softmax(z, sizes):
    return np.concatenate([_softmax(s) for s in np.split(z, np.cumsum(sizes)[:-1], -1)], -1)


def _kl_np(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _data(seed=0, n_concepts=20, signal=True, n_neutral=4, frames=(2, 4), d=D, layers=L, spread=1.5):
    """Synthetic probe data. With `signal`: layer 1 = M_attr h + noise where the model's distribution is
    softmax(h), layer 0 = noise drawn afresh for each row, layer 2 = a random code per concept (shared by
    its frames) unrelated to h. Without: every layer is a per-concept random code and h is independent
    of all of them. A concept has `frames` frames (2-4); neutral rows have their own concepts."""
    rng = np.random.default_rng(seed)
    acts, attrs, concepts, neutral, dists = [], [], [], [], []
    for attr, groups in GROUPS.items():
        G = len(groups)
        M = rng.normal(size=(d, G)) * 2.0
        for c in range(n_concepts + n_neutral):
            is_neutral = c >= n_concepts
            h = rng.normal(size=G) * (0.3 if is_neutral else spread)
            codes = rng.normal(size=(layers, d))
            for _ in range(1 if is_neutral else int(rng.integers(frames[0], frames[1] + 1))):
                hf = h + 0.2 * rng.normal(size=G)
                if signal:
                    x = np.stack([rng.normal(size=d), M @ hf + 0.3 * rng.normal(size=d), codes[2] + 0.1 * rng.normal(size=d)])
                else:
                    x = codes + 0.1 * rng.normal(size=(layers, d))
                acts.append(x)
                attrs.append(attr)
                concepts.append(f"{attr}-{'neutral' if is_neutral else 'concept'}-{c}")
                neutral.append(is_neutral)
                dists.append(_softmax(hf))
    return ProbeData(np.array(acts, dtype=np.float32), tuple(attrs), tuple(concepts), np.array(neutral),
                     tuple(dists), dict(GROUPS))


@pytest.fixture(scope="module")
def fitted():
    data = _data()
    probers, scores = fit(data)
    return data, probers, scores


def _random_probers(seed=0, sizes=(2, 3), layers=2, d=5, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    G = sum(sizes)
    A = torch.randn(layers, G, d, generator=g, dtype=dtype) * scale
    c = torch.randn(layers, G, generator=g, dtype=dtype)
    neutral = torch.cat([torch.softmax(torch.randn(n, generator=g, dtype=dtype), 0) for n in sizes])
    uniform = torch.cat([torch.full((n,), 1.0 / n, dtype=dtype) for n in sizes])
    return Probers(A, c, tuple(sizes), tuple(f"attr{i}" for i in range(len(sizes))),
                   {"neutral": neutral, "uniform": uniform}, torch.zeros(2, layers, len(GATE_QUANTILES)))


# ---- the analytic gradient ---------------------------------------------------------------------

@pytest.mark.parametrize("per_row_target", [False, True])
def test_kl_gradient_matches_autograd(per_row_target):
    probers = _random_probers(scale=1.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    if per_row_target:  # (4, 1, G): one target per row, broadcast over positions
        log_t = torch.stack([probers.targets["neutral"], probers.targets["uniform"]] * 2).log()[:, None, :]
    else:
        log_t = probers.targets["neutral"].log()
    for layer in range(2):
        kl, grad = probers.kl_to_target(x, layer, log_t)
        xr = x.clone().requires_grad_(True)
        z = xr @ probers.A[layer].T + probers.c[layer]
        ref = 0
        for zs, ts in zip(z.split(probers.sizes, -1), log_t.expand(*z.shape[:-1], -1).split(probers.sizes, -1)):
            p = torch.softmax(zs, -1)
            ref = ref + (p * (p.log() - ts)).sum(-1)
        (auto,) = torch.autograd.grad(ref.sum(), xr)
        assert kl.shape == (4, 7) and grad.shape == x.shape
        torch.testing.assert_close(kl, ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, auto, rtol=1e-9, atol=1e-12)
        assert float(kl.min()) >= 0 and float(grad.abs().max()) > 1e-3  # a real, non-trivial gradient


# ---- fitting and grouped cross-validation ------------------------------------------------------

def _score(scores, attr, layer):
    (s,) = [s for s in scores if s["attribute"] == attr and s["layer"] == layer]
    return s


def test_written_out_gradient_fits_what_autograd_fits():
    """softmax_regression's hand-written loss and gradient against the same L-BFGS run on autograd's
    (the fit as it was first written): soft labels, two L2 strengths, every layer at once."""
    gen = torch.Generator().manual_seed(0)
    F = torch.randn(2, 40, 5, generator=gen, dtype=torch.float64)
    Y = torch.softmax(torch.randn(40, 3, generator=gen, dtype=torch.float64), -1)
    l2 = torch.tensor([1e-3, 1.0], dtype=torch.float64)
    W = torch.zeros(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, 2, 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=30, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        logits = torch.einsum("lnk,rlkg->rlng", F, W) + b[:, :, None, :]
        ce = -(Y * torch.log_softmax(logits, -1)).sum(-1).mean(-1)
        total = (ce + l2[:, None] * (W ** 2).sum((2, 3))).sum()
        total.backward()
        return total

    opt.step(loss)
    got_W, got_b = P.softmax_regression(F, Y, l2, iters=30)
    assert got_W.shape == W.shape and got_b.shape == b.shape
    assert torch.allclose(got_W, W.detach(), atol=1e-8) and torch.allclose(got_b, b.detach(), atol=1e-8)
    assert got_W[1].abs().sum() < got_W[0].abs().sum()  # the stronger penalty shrinks


def test_principal_directions_are_the_svds_up_to_sign():
    X = np.random.default_rng(1).normal(size=(50, 2, 8)).astype(np.float32) * np.arange(1, 9)  # distinct spreads
    mu, sd, P_, F = P.features(X, 4)
    for layer in range(2):
        x = X[:, layer].astype(np.float64)
        z = (x - x.mean(0)) / (x.std(0) + 1e-6)
        vt = np.linalg.svd(z - z.mean(0), full_matrices=False)[2][:4]
        sign = np.sign((vt * P_[layer]).sum(-1))
        np.testing.assert_allclose(P_[layer], vt * sign[:, None], atol=1e-8)
        np.testing.assert_allclose(F[layer].numpy(), z @ (vt * sign[:, None]).T, atol=1e-8)
        np.testing.assert_allclose(mu[layer], x.mean(0), rtol=1e-10)


def test_fit_finds_the_signal_layer_and_not_the_noise(fitted):
    data, _, scores = fitted
    assert len(scores) == L * len(GROUPS)
    for attr in GROUPS:
        sig = _score(scores, attr, 1)
        assert sig["n_prompts"] == int(sum(1 for a, n in zip(data.attributes, data.neutral) if a == attr and not n))
        assert sig["n_concepts"] == 20
        assert sig["macro_f1"] > sig["majority_f1"] + 0.3, sig
        assert sig["kl"] < 0.1 * sig["kl_mean"], sig
        # fresh noise, and a per-concept code unrelated to the distribution (20 concepts: chance can help
        # a held-out fold a little, by up to a quarter over seeds 0-3; test_grouped_cv_... is the sharp test)
        for layer, bound in ((0, 0.9), (2, 0.7)):
            noise = _score(scores, attr, layer)
            assert noise["kl"] > bound * noise["kl_mean"], noise
            assert noise["macro_f1"] < sig["macro_f1"] - 0.2, noise
            assert noise["kl_mean"] == sig["kl_mean"]
        # kl_mean: each concept prompt's KL to the mean distribution of the training folds (neutral rows
        # included), over 5 folds grouped by concept, recomputed here
        from sklearn.model_selection import GroupKFold

        rows = [i for i, a in enumerate(data.attributes) if a == attr]
        Y = np.stack([data.distributions[i] for i in rows])
        scored = ~data.neutral[rows]
        base = np.zeros_like(Y)
        for train, test in GroupKFold(n_splits=5).split(rows, groups=[data.concepts[i] for i in rows]):
            base[test] = Y[train].mean(0)
        assert sig["kl_mean"] == pytest.approx(_kl_np(Y[scored], base[scored]).mean(), rel=1e-9)
        assert sig["kl_mean"] > 1.02 * _kl_np(Y[scored], Y[scored].mean(0)).mean()  # held out, so above in-sample


class _LeakyKFold:
    """GroupKFold that ignores the groups: a concept's frames land on both sides of a fold."""

    def __init__(self, n_splits):
        from sklearn.model_selection import KFold

        self.kfold = KFold(n_splits=n_splits, shuffle=True, random_state=0)

    def split(self, X, y=None, groups=None):
        return self.kfold.split(X)


def test_grouped_cv_is_not_fooled_by_per_concept_codes(monkeypatch):
    """The layer is a random code per concept (its four frames share it) and the distributions are
    independent of the codes: with the folds grouped by concept the held-out KL is no better than the
    mean's, while a CV that splits concepts (the same fit with the groups ignored) reports a strong prober.
    (40 concepts in 48 dimensions: enough concepts that chance rarely helps a held-out fold, few enough
    that a linear prober can memorise them.)"""
    import sklearn.model_selection

    data = _data(seed=0, n_concepts=40, signal=False, frames=(4, 4), d=48, layers=1, spread=1.0)
    _, grouped = fit(data)
    monkeypatch.setattr(sklearn.model_selection, "GroupKFold", _LeakyKFold)
    _, leaky = fit(data, l2_grid=(1e-2,))  # a weak penalty suffices to show the leak (and is cheaper)
    for attr in GROUPS:
        g, k = _score(grouped, attr, 0), _score(leaky, attr, 0)
        assert g["kl"] >= 0.85 * g["kl_mean"], g
        # and the penalty chosen on the held-out folds is a strong one, so the prober is the mean, not worse
        assert g["kl"] <= 1.05 * g["kl_mean"] and g["l2"] >= 1.0, g
        assert k["kl"] < 0.5 * k["kl_mean"], k  # the data would fool an ungrouped CV


def test_too_few_concepts_is_a_user_error():
    from repair.errors import UserError

    data = _data(n_concepts=1, n_neutral=1)
    with pytest.raises(UserError, match="too few search-split concepts"):
        fit(data)


# ---- the collapsed map and the targets ---------------------------------------------------------

def test_collapsed_map_and_targets(fitted):
    data, probers, _ = fitted
    sizes = probers.sizes
    assert sizes == (2, 3) and probers.attributes == ("gender", "race")
    assert probers.A.shape == (L, 5, D) and probers.c.shape == (L, 5) and probers.A.dtype == torch.float32
    X = data.activations.astype(np.float64)
    A, c = probers.A.double().numpy(), probers.c.double().numpy()
    offsets = {"gender": slice(0, 2), "race": slice(2, 5)}
    for attr, seg in offsets.items():
        rows = [i for i, a in enumerate(data.attributes) if a == attr]
        Y = np.stack([data.distributions[i] for i in rows])
        for layer in range(L):
            pred = _segment_softmax(X[rows, layer] @ A[layer].T + c[layer], sizes)
            np.testing.assert_allclose(pred.reshape(len(rows), -1)[:, :2].sum(-1), 1, atol=1e-12)
            np.testing.assert_allclose(pred[:, 2:].sum(-1), 1, atol=1e-12)
            # the intercept is not penalised, so at the optimum the fitted probabilities average to the
            # labels' average over the attribute's training rows (neutral ones included): this holds only
            # if standardise -> project -> linear was collapsed into (A, c) correctly
            np.testing.assert_allclose(pred[:, seg].mean(0), Y.mean(0), atol=2e-3)
        # on the signal layer the in-sample fit is close to the labels
        pred1 = _segment_softmax(X[rows, 1] @ A[1].T + c[1], sizes)[:, seg]
        assert _kl_np(Y, pred1).mean() < 0.1 * _kl_np(Y, Y.mean(0)).mean()
    # targets: uniform per segment; neutral = the mean distribution of each attribute's neutral rows
    torch.testing.assert_close(probers.targets["uniform"], torch.tensor([.5, .5, 1 / 3, 1 / 3, 1 / 3]))
    expect = np.concatenate([np.mean([d for d, a, n in zip(data.distributions, data.attributes, data.neutral)
                                      if a == attr and n], 0) for attr in GROUPS])
    np.testing.assert_allclose(probers.targets["neutral"].numpy(), expect, rtol=1e-6)


def test_neutral_target_without_neutral_rows_is_uniform():
    data = _data(n_concepts=4, n_neutral=0)
    probers, _ = fit(data, l2_grid=(1.0,))
    torch.testing.assert_close(probers.targets["neutral"], probers.targets["uniform"])


# ---- gate calibration --------------------------------------------------------------------------

def test_gate_levels_are_quantiles_of_the_kl(fitted):
    data, probers, _ = fitted
    assert probers.gate_kl.shape == (len(TARGETS), L, len(GATE_QUANTILES))
    assert GATE_QUANTILES[0] == 0
    assert torch.isneginf(probers.gate_kl[:, :, 0]).all()
    X = data.activations.astype(np.float64)
    A, c = probers.A.double().numpy(), probers.c.double().numpy()
    for t, name in enumerate(TARGETS):
        target = probers.targets[name].double().numpy()
        for layer in range(L):
            pred = _segment_softmax(X[:, layer] @ A[layer].T + c[layer], probers.sizes)
            terms = pred * (np.log(pred) - np.log(target))
            kl = terms[:, :2].sum(-1) + terms[:, 2:].sum(-1)
            expect = np.quantile(kl, GATE_QUANTILES[1:])
            got = probers.gate_kl[t, layer, 1:].double().numpy()
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)
            assert np.all(np.diff(got) > 0)


# ---- persistence -------------------------------------------------------------------------------

def test_save_load_round_trip(fitted, tmp_path):
    _, probers, _ = fitted
    path = tmp_path / "probers.safetensors"
    digest = probers.save(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back = Probers.load(path)
    assert back.sizes == probers.sizes and back.attributes == probers.attributes
    assert isinstance(back.sizes, tuple) and isinstance(back.attributes, tuple)
    for a, b in [(back.A, probers.A), (back.c, probers.c), (back.gate_kl, probers.gate_kl)] + \
            [(back.targets[k], probers.targets[k]) for k in TARGETS]:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    assert torch.isneginf(back.gate_kl[:, :, 0]).all()
    assert back.metadata() == probers.metadata()
    assert back.tensors().keys() == probers.tensors().keys()
    # saving again is byte-identical
    assert back.save(tmp_path / "again.safetensors") == digest


# ---- collect -----------------------------------------------------------------------------------

PROMPTS = ["The doctor said", "A nurse", "People who live in the city are often", "Why"]


def _by_hand(model, tok, prompt):
    """(L, d): each layer's MLP output at the last token, one unpadded prompt, with my own hooks."""
    seen = {}
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0, -1].clone()))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tok(prompt).input_ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[i] for i in range(len(model.model.layers))]).numpy()


def test_collect_reads_the_last_token_mlp_output():
    model, tok = tiny_llama(), ByteTokenizer(add_bos=True)
    expect = np.stack([_by_hand(model, tok, p) for p in PROMPTS])
    assert expect.shape == (len(PROMPTS), 3, 64)
    one = np.concatenate([collect(model, tok, [p]) for p in PROMPTS])
    padded = collect(model, tok, PROMPTS, batch=3)  # batches of 3 and 1, right-padded
    whole = collect(model, tok, PROMPTS)
    for got in (one, padded, whole):
        assert got.shape == expect.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    # the prompts really differ at the read position (the comparison is not between constants)
    assert np.abs(expect[0] - expect[1]).max() > 1e-4
    assert all(not h for m in P.mlp_modules(model) for h in [m._forward_hooks])  # hooks removed


def test_collect_reads_each_requested_position():
    """With positions, row (prompt, t) is the MLP output at token t: in a causal model, the last-token
    output of the prompt cut after token t (the byte tokenizer's token t >= 1 is byte t - 1)."""
    model, tok = tiny_llama(), ByteTokenizer(add_bos=True)
    at = [[3, 5, 15], [0, 7], [2, 30, 37], [3]]
    got = collect(model, tok, PROMPTS, batch=3, positions=at)
    expect = np.stack([_by_hand(model, tok, p[:t]) for p, pos in zip(PROMPTS, at) for t in pos])
    assert got.shape == (9, 3, 64)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        collect(model, tok, ["Why"], positions=[[4]])  # BOS + 3 bytes: positions 0..3


def test_read_positions_run_from_the_concept_to_the_prompt_end():
    from repair.evaluator import _Tokens
    from repair.suites.association import Prompt

    tok = ByteTokenizer(add_bos=True)
    tokens = _Tokens(tok)
    frame = "In the story, the {c} who moved in is"
    prompt = Prompt("gender", "gender:nurse", "nurse", frame.format(c="nurse"), ("f", "m"), (("she",), ("he",)),
                    "search", False, frame=frame)
    concept, middle, last = P.positions_of(tokens, prompt)
    ids = tokens(prompt.prompt, True)
    assert tok.decode(ids[:concept + 1]) == "In the story, the nurse"
    assert last == len(ids) - 1 and concept < middle < last and middle == (concept + last) // 2
    # a concept at the prompt's end: one position, not three copies of it
    end = Prompt("gender", "gender:nurse", "nurse", "The nurse", ("f", "m"), (("she",), ("he",)), "search", False,
                 frame="The {c}")
    assert P.positions_of(tokens, end) == [len(tokens("The nurse", True)) - 1]


def test_one_probe_pass_at_two_sites_equals_a_pass_for_each():
    """The run's shared pass (MLP outputs for FairMed, the residual stream for FairSteer, one forward):
    each site's data equals that site's own probe_data pass, row for row, and a site is handed out once."""
    from repair.methods.fairsteer.steering import residual_modules
    from repair.methods.probe_pass import ProbePass
    from repair.models import LoadedModel, ModelSpec
    from repair.suites.base import EvalConfig

    model, tok = tiny_llama(), ByteTokenizer(add_bos=True)
    loaded = LoadedModel(model, tok, ModelSpec("tiny"), "tiny", None)
    config = EvalConfig(split="search", attributes=("gender", "age"))
    shared = ProbePass(loaded, config, {"mlp": P.mlp_modules(model), "residual": residual_modules(model)})
    for site, modules in (("mlp", None), ("residual", residual_modules(model))):
        alone = P.probe_data(loaded, config, progress=False, modules=modules)
        together = shared.data(site)
        np.testing.assert_array_equal(together.activations, alone.activations)
        assert together.attributes == alone.attributes and together.concepts == alone.concepts
        assert together.stereotyped == alone.stereotyped and np.array_equal(together.neutral, alone.neutral)
        assert all(np.array_equal(a, b) for a, b in zip(together.distributions, alone.distributions))
    assert not np.allclose(P.probe_data(loaded, config, progress=False).activations,
                           P.probe_data(loaded, config, progress=False, modules=residual_modules(model)).activations)
    with pytest.raises(RuntimeError, match="handed out already"):
        shared.data("mlp")
