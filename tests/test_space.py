"""Configuration spaces: keys name the method and round-trip to what the intervention takes."""
import numpy as np

from repair.methods.fairmed.neutralizer import NeutralizerSetting
from repair.methods.fairmed.space import LayerSubsetSpace
from repair.methods.prune import masks as M
from repair.methods.prune.space import HeadMaskSpace
from repair.space import BASE, method_of


def test_head_mask_keys_round_trip_and_the_full_mask_is_the_shared_base():
    space = HeadMaskSpace((3, 4), 0.5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        bits = rng.random(12) < 0.7
        key = space.key(bits)
        assert np.array_equal(space.bits(key), bits)
        assert np.array_equal(space.config(key), bits.reshape(3, 4))
        if not bits.all():
            assert key == "prune:" + M.to_key(bits.reshape(3, 4)) and method_of(key) == "prune"
    assert space.key(np.ones(12, bool)) == BASE and method_of(BASE) is None
    assert space.describe("prune:" + M.to_key(np.arange(12).reshape(3, 4) != 5)) == {"pruned_heads": [[1, 1]]}
    assert space.max_changed == 6


def test_layer_subset_keys_round_trip_with_their_setting():
    space = LayerSubsetSpace(6, 3, "uniform")
    assert len(space.settings) == 4 * 2 * 4 and len(set(space.settings)) == 32
    bits = np.array([1, 0, 1, 1, 0, 1], bool)
    key = space.key(bits, (0.2, 3, 0.75))
    assert key == "fairmed:1,4/lam=0.2/steps=3/gate=0.75/target=uniform" and method_of(key) == "fairmed"
    assert space.config(key) == NeutralizerSetting((1, 4), 0.2, 3, 0.75, "uniform")
    assert np.array_equal(space.bits(key), bits) and space.setting(key) == (0.2, 3, 0.75)
    assert space.features(key).tolist() == [1, 0, 1, 1, 0, 1, 1.0, 1.0, 0.75]  # log2(0.2/0.1), 3/3, gate
    assert space.key(np.ones(6, bool), (0.2, 3, 0.75)) == BASE
    assert space.config(BASE).layers == () and space.config(BASE).target == "uniform"
    assert space.describe(key) == {"layers": [1, 4], "lambda": 0.2, "steps": 3, "gate": 0.75, "target": "uniform"}
