"""The FairMed neutralizer on a tiny random Llama with random probers: removable without a trace, one
setting per batch row, the step bounded by lambda * |x| and going down the KL, the gate, KV-cache
generation, and the errors for bad settings."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from repair.methods.fairmed.neutralizer import Neutralizer, NeutralizerSetting as S
from repair.methods.fairmed.probers import GATE_QUANTILES, TARGETS, Probers
from tiny import ByteTokenizer, tiny_llama

SIZES = (2, 3)
LAYERS, WIDTH = 3, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def _probers(layers=LAYERS, width=WIDTH, seed=0, gate=None):
    """Random probers; the tiny model's MLP outputs have norm ~0.02, so A is scaled to give logits of a
    few units. gate_kl: level 0 -inf (treat everything), the others 0 unless `gate` says otherwise."""
    g = torch.Generator().manual_seed(seed)
    G = sum(SIZES)
    A = torch.randn(layers, G, width, generator=g) * 100
    c = torch.randn(layers, G, generator=g)
    gate_kl = torch.zeros(len(TARGETS), layers, len(GATE_QUANTILES)) if gate is None else gate
    gate_kl[:, :, 0] = -torch.inf
    return Probers(A, c, SIZES, ("gender", "race"),
                   {"neutral": torch.tensor([.7, .3, .2, .3, .5]), "uniform": torch.tensor([.5, .5, 1 / 3, 1 / 3, 1 / 3])},
                   gate_kl)


def _ids(batch=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 257, (batch, length), generator=g)
    ids[:, 0] = 257  # BOS
    return ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _kl64(probers, x, layer, target):
    """KL(prober(x) || target) summed over attributes, in float64, written out independently."""
    z = x.double() @ probers.A[layer].double().T + probers.c[layer].double()
    t = probers.targets[target].double()
    total = 0
    for zs, ts in zip(z.split(SIZES, -1), t.split(SIZES, -1)):
        logp = torch.log_softmax(zs, -1)
        total = total + (logp.exp() * (logp - ts.log())).sum(-1)
    return total


class _Capture:
    """The MLP outputs of every layer just before the neutralizer's hook (`pre`, a hook put first) and
    just after it (`post`, a hook registered after the neutralizer's)."""

    def __init__(self, model):
        self.pre, self.post, self.handles = {}, {}, []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.register_forward_hook(
                lambda m, a, o, i=i: self.pre.__setitem__(i, o.detach().clone()), prepend=True))

    def after(self, model):
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.register_forward_hook(
                lambda m, a, o, i=i: self.post.__setitem__(i, o.detach().clone())))
        return self

    def remove(self):
        for h in self.handles:
            h.remove()


def _no_hooks(model):
    return all(not layer.mlp._forward_hooks for layer in model.model.layers)


# ---- removal -----------------------------------------------------------------------------------

def test_remove_restores_the_model_exactly(model):
    ids = _ids()
    before = _logits(model, ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hook = Neutralizer(model, _probers(), [S((0, 1, 2), lam=2.0, steps=3)])
    changed = _logits(model, ids)
    assert (changed - before).abs().max() > 1e-3  # it did something while attached
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # never touches a weight, even while attached
    hook.remove()
    assert _no_hooks(model)
    assert torch.equal(_logits(model, ids), before)
    hook.remove()  # safe twice
    with Neutralizer(model, _probers(), [S((1,), lam=2.0)]):
        assert not _no_hooks(model)
    assert _no_hooks(model)
    assert torch.equal(_logits(model, ids), before)


# ---- one setting per row -----------------------------------------------------------------------

SETTINGS = [S((0, 2), lam=0.8, steps=2, target="neutral"), S((1,), lam=1.5, steps=1, target="uniform"), S()]


def test_per_row_settings_equal_separate_forwards(model):
    ids = _ids(batch=3)
    base = _logits(model, ids)
    with Neutralizer(model, _probers(), SETTINGS) as hook:
        hook.set_rows([0, 1, 2])
        batched = _logits(model, ids)
        hook.set_rows([2, 0, 0])  # rows may repeat settings, in any order
        shuffled = _logits(model, ids)
        separate = []
        for i, s in enumerate(SETTINGS):
            hook.set_variants([s])  # one setting: no set_rows needed
            separate.append(_logits(model, ids[i:i + 1])[0])
            assert hook.n_variants == 1
        hook.set_variants([SETTINGS[0]])
        under0 = _logits(model, ids)  # every row under setting 0
    for i in range(3):
        torch.testing.assert_close(batched[i], separate[i], rtol=1e-5, atol=1e-5)
    assert (batched[0] - base[0]).abs().max() > 1e-3 and (batched[1] - base[1]).abs().max() > 1e-3
    # the identity setting's row is the unhooked model's, bit for bit (in the same batch and alone)
    assert torch.equal(batched[2], base[2])
    assert torch.equal(separate[2], _logits(model, ids[2:3])[0])
    assert torch.equal(shuffled[0], base[0])
    torch.testing.assert_close(shuffled[1:], under0[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], under0[0], rtol=1e-5, atol=1e-5)
    assert (shuffled[1] - batched[1]).abs().max() > 1e-3  # row 1 under settings 0 and 1 differs
    assert (separate[0][None] - _logits(model, ids[:1])).abs().max() > 1e-3


# ---- the step: bounded, down the KL ------------------------------------------------------------

def _reference_steps(probers, x, layer, target, lam, steps):
    """The documented iteration in float64 with autograd: `steps` moves of length lam |x| / steps along
    -grad/|grad|, the total projected back onto the ball of radius lam |x| after each move."""
    x = x.double()
    radius = lam * x.norm(dim=-1, keepdim=True)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        xd = (x + delta).requires_grad_(True)
        (grad,) = torch.autograd.grad(_kl64(probers, xd, layer, target).sum(), xd)
        delta = delta - radius / steps * grad / grad.norm(dim=-1, keepdim=True)
        delta = delta * torch.clamp(radius / delta.norm(dim=-1, keepdim=True), max=1.0)
    return delta


@pytest.mark.parametrize("lam, steps", [(0.3, 3), (0.05, 2)])
def test_steps_are_bounded_and_follow_the_documented_iteration(model, lam, steps):
    probers = _probers()
    cap = _Capture(model)
    try:
        with Neutralizer(model, probers, [S((0, 1, 2), lam=lam, steps=steps)]):
            cap.after(model)
            _logits(model, _ids())
    finally:
        cap.remove()
    for layer in range(LAYERS):
        x, y = cap.pre[layer], cap.post[layer]
        radius = lam * x.norm(dim=-1)
        delta = (y - x).norm(dim=-1)
        assert bool((delta <= radius + 1e-5).all()), layer
        assert bool((delta > 0).all())  # every position is treated at gate level 0
        expect = _reference_steps(probers, x, layer, "neutral", lam, steps)
        assert bool((((y - x).double() - expect).norm(dim=-1) <= 1e-3 * radius + 1e-7).all()), layer
        kl_before, kl_after = _kl64(probers, x, layer, "neutral"), _kl64(probers, y, layer, "neutral")
        assert float(kl_after.mean()) < 0.9 * float(kl_before.mean()), layer
        if lam <= 0.05:  # short moves: the KL falls at every position (long fixed-length moves may overshoot)
            assert bool((kl_after < kl_before).all()), layer


def test_one_small_step_goes_down_the_autograd_gradient(model):
    """steps=1: delta = -lam |x| grad/|grad|, with grad the autograd gradient of the KL; the KL falls."""
    lam = 0.01
    probers = _probers()
    cap = _Capture(model)
    try:
        with Neutralizer(model, probers, [S((0, 1, 2), lam=lam, steps=1, target="uniform")]):
            cap.after(model)
            _logits(model, _ids(batch=2))
    finally:
        cap.remove()
    for layer in range(LAYERS):
        x = cap.pre[layer].double().requires_grad_(True)
        (grad,) = torch.autograd.grad(_kl64(probers, x, layer, "uniform").sum(), x)
        radius = lam * x.detach().norm(dim=-1, keepdim=True)
        expect = -radius * grad / grad.norm(dim=-1, keepdim=True)
        delta = cap.post[layer].double() - x.detach()
        assert bool(((delta - expect).norm(dim=-1) <= 1e-3 * radius[..., 0] + 1e-7).all()), layer
        before = _kl64(probers, x.detach(), layer, "uniform")
        after = _kl64(probers, cap.post[layer], layer, "uniform")
        assert bool((after < before).all()), layer


def test_neutralize_leaves_untreated_rows_alone(model):
    """Called directly: rows whose setting does not treat the layer come back as they went in."""
    probers = _probers()
    with Neutralizer(model, probers, [S((0,), lam=0.5, steps=3), S((1,), lam=0.5)]) as hook:
        out = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(5)) * 0.003
        keep = out.clone()
        res = hook.neutralize(out, 0, torch.tensor([0, 1]), torch.tensor([True, False]))
    assert torch.equal(out, keep)  # the input is not modified in place
    assert out.shape == res.shape and res.dtype == out.dtype
    assert torch.equal(res[1], out[1])
    expect = _reference_steps(probers, out[0], 0, "neutral", 0.5, 3)
    radius = 0.5 * out[0].norm(dim=-1)
    assert bool((((res[0] - out[0]).double() - expect).norm(dim=-1) <= 1e-3 * radius + 1e-7).all())
    assert bool(((res[0] - out[0]).norm(dim=-1) > 0).all())


# ---- the gate ----------------------------------------------------------------------------------

def test_gate_treats_only_the_positions_above_the_threshold(model):
    ids = _ids(batch=2, length=16, seed=3)
    probers = _probers()
    base = {}
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: base.__setitem__(1, o.clone()))
    try:
        _logits(model, ids)
    finally:
        handle.remove()
    kl = _kl64(probers, base[1], 1, "uniform")
    s = np.sort(kl.flatten().numpy())
    k = len(s) // 2
    threshold = float((s[k - 1] + s[k]) / 2)  # between two positions' KL: about half fire
    assert s[k] - s[k - 1] > 1e-4  # a margin that float32 rounding cannot cross
    gate = torch.zeros(len(TARGETS), LAYERS, len(GATE_QUANTILES))
    level = GATE_QUANTILES.index(0.5)
    gate[TARGETS.index("uniform"), 1, level] = threshold
    # traps: the other target, another layer, another level would treat every position
    gate[TARGETS.index("neutral"), 1, level] = -torch.inf
    gate[TARGETS.index("uniform"), 0, level] = -torch.inf
    gate[TARGETS.index("uniform"), 1, level + 1] = -torch.inf
    probers = replace(probers, gate_kl=gate)
    cap = _Capture(model)
    try:
        with Neutralizer(model, probers, [S((1,), lam=0.5, steps=2, gate=0.5, target="uniform")]):
            cap.after(model)
            _logits(model, ids)
    finally:
        cap.remove()
    assert torch.equal(cap.pre[1], base[1])  # nothing upstream of layer 1 was touched
    fires = kl > threshold
    assert 0 < int(fires.sum()) < fires.numel()
    assert torch.equal(cap.post[1][~fires], base[1][~fires])  # untreated: bit-identical
    assert bool(((cap.post[1] - base[1]).norm(dim=-1)[fires] > 0).all())
    assert torch.equal(cap.post[0], cap.pre[0]) and torch.equal(cap.post[2], cap.pre[2])  # layers not chosen


def test_infinite_threshold_changes_nothing(model):
    ids = _ids()
    gate = torch.zeros(len(TARGETS), LAYERS, len(GATE_QUANTILES))
    gate[:, :, GATE_QUANTILES.index(0.9)] = torch.inf
    with Neutralizer(model, _probers(gate=gate), [S((0, 1, 2), lam=5.0, steps=3, gate=0.9)]):
        gated = _logits(model, ids)
    assert torch.equal(gated, _logits(model, ids))
    with Neutralizer(model, _probers(gate=gate), [S((0, 1, 2), lam=5.0, steps=3, gate=0.0)]):
        ungated = _logits(model, ids)
    assert (ungated - gated).abs().max() > 1e-2  # the same setting at level 0 does change the output


# ---- generation with the KV cache --------------------------------------------------------------

def _generate(model, ids, cache):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=8, use_cache=cache, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_generate_with_and_without_cache_agree(model):
    tok = ByteTokenizer(add_bos=True)
    ids = torch.tensor([tok("The doctor said that").input_ids])
    base = _generate(model, ids, True)
    assert torch.equal(base, _generate(model, ids, False))
    strong = S((0, 1, 2), lam=5.0, steps=3)
    with Neutralizer(model, _probers(), [strong]):
        cached, uncached = _generate(model, ids, True), _generate(model, ids, False)
    assert cached.shape == (1, 8)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)
    # two rows, two settings, through every decoding step: the identity row is the base model's
    with Neutralizer(model, _probers(), [S(), strong]) as hook:
        hook.set_rows([0, 1])
        both = _generate(model, ids.repeat(2, 1), True)
    assert torch.equal(both[0], base[0]) and torch.equal(both[1], cached[0])


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    (S((3,)), "layer 3 is out of range"),
    (S((0, -1)), "layer -1 is out of range"),
    (S((0,), lam=-0.1), "lambda must be 0 or more"),
    (S((0,), lam=float("nan")), "lambda must be 0 or more"),
    (S((0,), steps=0), "steps must be at least 1"),
    (S((0,), gate=0.3), "gate must be one of"),
    (S((0,), target="women"), "target must be one of"),
])
def test_bad_settings_raise(model, setting, message):
    with pytest.raises(ValueError, match=message):
        Neutralizer(model, _probers(), [S(), setting])
    assert _no_hooks(model)  # a failed construction leaves nothing behind
    with Neutralizer(model, _probers(), [S()]) as hook:
        with pytest.raises(ValueError, match=message):
            hook.set_variants([setting])


def test_mismatched_probers_raise(model):
    with pytest.raises(ValueError, match="2 layers but the model has 3"):
        Neutralizer(model, _probers(layers=2))
    with pytest.raises(ValueError, match="width 32"):
        Neutralizer(model, _probers(width=32))
    with pytest.raises(ValueError, match="at least one setting"):
        Neutralizer(model, _probers(), [])
    assert _no_hooks(model)


def test_rows_must_match_the_batch(model):
    ids = _ids(batch=3)
    with Neutralizer(model, _probers(), [S((0,)), S((1,))]) as hook:
        with pytest.raises(RuntimeError, match="call set_rows"):
            _logits(model, ids)
        hook.set_rows([0, 1])
        with pytest.raises(RuntimeError, match="set_rows was given 2 rows but the forward has batch size 3"):
            _logits(model, ids)
        with pytest.raises(ValueError, match="variant ids"):
            hook.set_rows([0, 2, 1])
        hook.set_rows([0, 1, 1])
        _logits(model, ids)
        hook.set_variants([S((0,)), S((1,))])  # forgets the rows
        with pytest.raises(RuntimeError, match="call set_rows"):
            _logits(model, ids)
    assert _no_hooks(model)
