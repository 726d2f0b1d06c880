"""Head masking and pruning, checked against a second implementation: zeroing weight slices by hand."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from repair.errors import UserError
from repair.methods.prune.heads import HeadMasker, attention_output, decoder_layers, head_layout, prune_checkpoint
from tiny import tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def ids(batch=4, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 257, (batch, length), generator=g)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def zeroed_copy(model, heads):
    """Reference: a deep copy with each (layer, head)'s slice of the output projection weight zeroed,
    written out per architecture by hand (not through repair.methods.prune.heads)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        if hasattr(ref, "transformer"):  # GPT-2: Conv1D weight is [in, out], so heads are rows
            hd = ref.config.n_embd // ref.config.n_head
            for layer, head in heads:
                ref.transformer.h[layer].attn.c_proj.weight[head * hd:(head + 1) * hd, :] = 0
        else:  # Llama: Linear weight is [out, in], so heads are columns
            hd = ref.config.hidden_size // ref.config.num_attention_heads
            for layer, head in heads:
                ref.model.layers[layer].self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] = 0
    return ref


def mask_for(model, heads):
    n_layers, n_heads, _ = head_layout(model)
    mask = torch.ones(n_layers, n_heads)
    for layer, head in heads:
        mask[layer, head] = 0
    return mask


def no_hooks_left(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_layout_of_tiny_models():
    assert head_layout(tiny_llama()) == (3, 4, 16)
    assert head_layout(tiny_gpt2()) == (3, 4, 16)
    llama = tiny_llama()
    assert attention_output(decoder_layers(llama)[2]) is llama.model.layers[2].self_attn.o_proj


def test_all_ones_mask_is_bit_identical(model):
    x = ids()
    before = logits(model, x)
    with HeadMasker(model, torch.ones(1, *head_layout(model)[:2])):
        during = logits(model, x)
    assert torch.equal(before, during)


@pytest.mark.parametrize("heads", [[(1, 2)], [(0, 0), (2, 3), (2, 1)]])
def test_masking_equals_zeroing_the_weight_slice(model, heads):
    x = ids()
    expected = logits(zeroed_copy(model, heads), x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with HeadMasker(model, mask_for(model, heads)[None]):
        got = logits(model, x)
    assert not torch.allclose(got, logits(model, x), atol=1e-4)  # the mask did something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # caller's weights untouched


def test_variants_in_one_batch_equal_each_row_alone(model):
    masks = torch.stack([mask_for(model, []), mask_for(model, [(0, 1), (1, 3)]), mask_for(model, [(2, 0)])])
    rows = [0, 1, 2, 1]
    x = ids(batch=4)
    with HeadMasker(model, masks) as masker:
        masker.set_rows(torch.tensor(rows))
        batched = logits(model, x)
    for i, v in enumerate(rows):
        with HeadMasker(model, masks[v:v + 1]):
            alone = logits(model, x[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[1], logits(model, x[1:2])[0], atol=1e-4)  # rows did get different masks


def test_remove_restores_outputs_and_leaves_no_hooks(model):
    x = ids()
    before = logits(model, x)
    masker = HeadMasker(model, mask_for(model, [(0, 0), (1, 1)])[None])
    assert not torch.equal(logits(model, x), before)
    masker.remove()
    masker.remove()  # idempotent
    assert torch.equal(logits(model, x), before)
    assert no_hooks_left(model)
    with HeadMasker(model, mask_for(model, [(2, 2)])[None]):
        pass
    assert no_hooks_left(model)


def test_prune_checkpoint_loads_in_plain_transformers(model, tmp_path):
    from transformers import AutoModelForCausalLM

    heads = [(0, 3), (1, 0), (1, 2)]
    mask = mask_for(model, heads)
    x = ids()
    with HeadMasker(model, mask[None]):
        masked = logits(model, x)
    pruned = copy.deepcopy(model)
    assert prune_checkpoint(pruned, mask) == sorted([list(h) for h in heads])
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), masked, atol=1e-5, rtol=0)
    # The zeroes survive the round trip: every saved tensor equals the hand-zeroed reference's.
    reference = zeroed_copy(model, heads).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_grouped_query_attention_masks_one_query_head():
    model = tiny_llama()
    assert model.config.num_key_value_heads == 2  # q heads 0,1 share kv head 0
    x = ids()
    with HeadMasker(model, mask_for(model, [(1, 1)])[None]):
        got = logits(model, x)
    torch.testing.assert_close(got, logits(zeroed_copy(model, [(1, 1)]), x), atol=1e-5, rtol=0)
    # Not the whole key/value group: q head 0 of the same group still contributes.
    assert not torch.allclose(got, logits(zeroed_copy(model, [(1, 0), (1, 1)]), x), atol=1e-4)


def test_generate_with_kv_cache_is_masked_on_every_step(model):
    heads = [(0, 0), (0, 2), (1, 1), (1, 3), (2, 0), (2, 1)]
    prompt = ids(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    expected = zeroed_copy(model, heads).generate(prompt, **kwargs)
    with HeadMasker(model, mask_for(model, heads)[None]):
        got = model.generate(prompt, **kwargs)
    unmasked = model.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    # Each decoding step (the KV-cache path) is masked, not only the prompt's forward.
    for step, (g, e, u) in enumerate(zip(got.logits, expected.logits, unmasked.logits)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0, msg=f"step {step}")
        assert not torch.allclose(g, u, atol=1e-4), f"step {step}: the mask changed nothing"


def test_bfloat16_masks_follow_the_model():
    model = tiny_llama().to(torch.bfloat16)
    heads = [(1, 2)]
    x = ids()
    with HeadMasker(model, mask_for(model, heads)[None]) as masker:
        assert masker._layer_masks[0].dtype == torch.bfloat16
        got = logits(model, x)
    torch.testing.assert_close(got, logits(zeroed_copy(model, heads), x), atol=1e-2, rtol=0)


def test_misuse_is_reported():
    model = tiny_llama()
    with pytest.raises(ValueError, match="shape"):
        HeadMasker(model, torch.ones(1, 3, 5))
    with HeadMasker(model, torch.ones(2, 3, 4)) as masker:
        with pytest.raises(RuntimeError, match="set_rows"):
            logits(model, ids())
        with pytest.raises(ValueError, match="variant ids"):
            masker.set_rows([0, 2])
        masker.set_rows([0, 1])
        with pytest.raises(RuntimeError, match="batch size"):
            logits(model, ids(batch=3))
    with pytest.raises(ValueError, match="0/1"):
        prune_checkpoint(model, torch.full((3, 4), 0.5))


def test_unsupported_architecture_names_the_class():
    class DummyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

    with pytest.raises(UserError, match="DummyLM.*head pruning does not support"):
        HeadMasker(DummyLM(), torch.ones(1, 1, 1))

    class NoAttentionLM(nn.Module):  # blocks are found, their attention projection is not
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UserError, match="NoAttentionLM.*head pruning does not support"):
        head_layout(NoAttentionLM())


ARCHITECTURES = [  # config class, its kwargs, expected attention output path inside a block, layout
    ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
     "attention.dense", (2, 4, 16)),
    ("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                       word_embed_proj_dim=64), "self_attn.out_proj", (2, 4, 16)),
    ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "self_attention.dense",
     (2, 4, 16)),
    ("PhiConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
     "self_attn.dense", (2, 4, 16)),
    ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "attn.out_proj", (2, 4, 16)),
    ("GemmaConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=32, intermediate_size=128), "self_attn.o_proj", (2, 4, 32)),
]


@pytest.mark.parametrize("config_name, kwargs, path, layout", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_other_architectures_are_found(config_name, kwargs, path, layout):
    import transformers

    config = getattr(transformers, config_name)(vocab_size=100, bos_token_id=1, eos_token_id=2, **kwargs)
    with torch.device("meta"):  # structure only, no weights
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert head_layout(model) == layout
    block = decoder_layers(model)[1]
    expected = block
    for name in path.split("."):
        expected = getattr(expected, name)
    assert attention_output(block) is expected
