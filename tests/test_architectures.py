"""Every architecture the tool is tested on, as a tiny random model built from its config, each with its
post-head logit transform set so that it bites (Gemma 2/3 soft-capping at 2.0, Cohere's logit_scale 0.3,
Granite's logits_scaling 4.0) and a sliding window shorter than the prompts where it has one:

- the fast evaluator's option log-probs and token NLLs equal the plain `model(...)` forward's
  log-softmax, computed here independently;
- head masking equals zeroing the head's input columns of the attention output projection, on a copy,
  with the module paths written out here by hand (not through repair.arch);
- repair.arch finds each part, and an architecture the evaluator cannot reproduce is refused in one line.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from repair import arch
from repair.errors import UserError
from repair.evaluator import Evaluator
from repair.methods.prune.heads import HeadMasker, head_layout
from repair.suites.base import ChoiceRequest
from tiny import FAMILIES, ByteTokenizer, tiny_causal_lm, tiny_llama

# family -> (attention output projection of block l, its paths in repair.arch's sense: MLP output, final norm)
BY_HAND = {
    "llama": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
    "gpt2": (lambda m, l: m.transformer.h[l].attn.c_proj, "mlp", "transformer.ln_f"),
    "gemma2": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
    "gemma3": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
    "qwen2": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
    "phi3": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
    "gpt_neox": (lambda m, l: m.gpt_neox.layers[l].attention.dense, "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "opt": (lambda m, l: m.model.decoder.layers[l].self_attn.out_proj, "fc2", "model.decoder.final_layer_norm"),
    "cohere": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
    "granite": (lambda m, l: m.model.layers[l].self_attn.o_proj, "mlp", "model.norm"),
}
TOK = ByteTokenizer(add_bos=True)
NON_WORD = [0, 257, 258] + [b + 1 for b in range(128) if not (chr(b).isalnum() or chr(b) == "_")]


def test_every_family_is_listed_here():
    assert set(BY_HAND) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, tiny_causal_lm(request.param)


def _requests():
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):  # prompts of 14-40 tokens: longer than the sliding windows (6)
        prompt = f"Item {i}: the " + "word " * int(rng.integers(1, 6)) + "was"
        options = tuple(" " + "xyz"[j] * int(rng.integers(1, 4)) for j in range(int(rng.integers(2, 4))))
        out.append(ChoiceRequest(prompt, options, word_end=bool(i % 2)))
    out.append(ChoiceRequest("One", ("x", "y")))
    return out


def plain_scores(model, request: ChoiceRequest) -> list[float]:
    """Each option's log-prob from the plain forward of [BOS] + bytes(prompt + option) (what the byte
    tokenizer gives for the joint string), plus, with word_end, the log-probability that the next token
    is not a word character."""
    prompt = [257] + [b + 1 for b in request.prompt.encode()]
    out = []
    for option in request.options:
        opt = [b + 1 for b in option.encode()]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + opt])).logits[0].double(), -1)
        total = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(opt))
        if request.word_end:
            total += float(torch.logsumexp(logp[-1, NON_WORD], 0))
        out.append(total)
    return out


def test_option_scores_equal_the_plain_forward(family):
    name, model = family
    requests = _requests()
    for batch_tokens in (64, 4096):
        fast = Evaluator(model, TOK, batch_tokens=batch_tokens, progress=False).score_choices(requests)
        for scores, request in zip(fast, requests):
            np.testing.assert_allclose(scores.logprob, plain_scores(model, request), atol=1e-4, err_msg=name)
            assert scores.n_tokens.tolist() == [len(o.encode()) for o in request.options]


def test_token_nll_equals_the_plain_forward(family):
    name, model = family
    ids = np.random.default_rng(1).integers(1, 256, size=70)
    window, stride = 16, 6
    fast = Evaluator(model, TOK, batch_tokens=40, progress=False).token_nll(ids, window, stride)
    expected = np.zeros(len(ids) - 1)
    for b in range(0, len(ids), stride):  # independent sliding windows: every token once, latest context
        e = min(b + window, len(ids))
        first = 1 if b == 0 else max(b + window - stride, 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.as_tensor(ids[b:e])[None]).logits[0].double(), -1)
        for t in range(first, e):
            expected[t - 1] = -float(logp[t - 1 - b, ids[t]])
        if e == len(ids):
            break
    np.testing.assert_allclose(fast, expected, atol=1e-4, err_msg=name)


def _zeroed(model, name, heads):
    """A copy with each head's input columns of the attention output projection zeroed, by hand."""
    ref = copy.deepcopy(model)
    cfg = ref.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for layer, head in heads:
            proj = BY_HAND[name][0](ref, layer)
            if name == "gpt2":  # Conv1D: weight is [in, out]
                proj.weight[head * hd:(head + 1) * hd, :] = 0
            else:
                proj.weight[:, head * hd:(head + 1) * hd] = 0
    return ref


def test_head_masking_equals_zeroing_the_projection(family):
    name, model = family
    n_layers, n_heads, _ = head_layout(model)
    assert (n_layers, n_heads) == (2, 4)
    variants = [[(0, 1)], [(1, 0), (1, 3), (0, 2)]]
    masks = torch.ones(len(variants), n_layers, n_heads)
    for v, heads in enumerate(variants):
        for layer, head in heads:
            masks[v, layer, head] = 0
    x = torch.randint(1, 257, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = [_zeroed(model, name, heads)(x).logits for heads in variants]
    with HeadMasker(model, masks) as masker, torch.no_grad():
        masker.set_rows([0, 0])
        torch.testing.assert_close(model(x).logits, expected[0], atol=1e-5, rtol=0)
        masker.set_rows([1, 1])
        torch.testing.assert_close(model(x).logits, expected[1], atol=1e-5, rtol=0)
        # and through the evaluator, both variants in the same batched forwards
        requests = _requests()[:4]
        scored = Evaluator(model, TOK, progress=False, on_rows=masker.set_rows).score_choices_variants(requests, 2)
    for v, heads in enumerate(variants):
        ref = _zeroed(model, name, heads)
        for scores, request in zip(scored[v], requests):
            np.testing.assert_allclose(scores.logprob, plain_scores(ref, request), atol=1e-4)


def test_arch_finds_every_part(family):
    name, model = family
    layers = arch.decoder_layers(model)
    assert len(layers) == 2
    assert arch.attention_output(layers[1], model) is BY_HAND[name][0](model, 1)
    assert arch.mlp_output(layers[0], model) is arch.get_path(layers[0], BY_HAND[name][1])
    norm = arch.final_norm(model)
    assert norm is arch.get_path(model, BY_HAND[name][2])
    x = torch.randint(1, 257, (1, 7), generator=torch.Generator().manual_seed(4))
    seen = {}
    handles = [norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out)),
               arch.mlp_output(layers[0], model).register_forward_hook(lambda m, a, out: torch.zeros_like(out))]
    with torch.no_grad():
        last = model.base_model(input_ids=x).last_hidden_state
        knocked_out = model(input_ids=x).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["norm"], last)  # the final norm is the backbone's last step
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, knocked_out)  # the MLP output is on the path


class UnknownTransformLM(nn.Module):
    """A causal LM whose forward squashes its logits in a way no table knows, honouring logits_to_keep."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def base_model(self):
        return self.inner.model

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        out = self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = 3 * torch.sin(out.logits / 3) - 0.5 * out.logits
        return out


class AllPositionsLM(UnknownTransformLM):
    """Like UnknownTransformLM, but its forward ignores logits_to_keep (as older or remote code does)."""

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, logits_to_keep=0, **kwargs)


def test_an_unknown_transform_is_applied_when_the_forward_takes_the_positions():
    model = UnknownTransformLM(tiny_llama()).eval()
    requests = _requests()
    for scores, request in zip(Evaluator(model, TOK, progress=False).score_choices(requests), requests):
        np.testing.assert_allclose(scores.logprob, plain_scores(model, request), atol=1e-4)


def test_an_architecture_the_evaluator_cannot_reproduce_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^AllPositionsLM: the fast evaluator cannot reproduce") as e:
        Evaluator(AllPositionsLM(tiny_llama()).eval(), TOK, progress=False)
    assert "\n" not in str(e.value)
