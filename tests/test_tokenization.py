"""Options are scored on the tokens the model would see: the suffix of tokenize(prompt + option) after
tokenize(prompt), with one BOS; a boundary merge is counted; the word-end term of `word_end` requests.

Every expected score here is computed independently: the tokenizer called on the joint string, the
plain forward's log-softmax, and a word-start mask written out per tokenizer by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from repair.evaluator import Evaluator, ReferenceScorer, word_start_mask
from repair.suites.base import ChoiceRequest
from repair.suites.bbq import BBQItem, choice_request
from tiny import ByteTokenizer, metaspace_tokenizer, tiny_gpt2, tiny_llama

CORPUS = ["The Christian and the Muslim met a group of Christians and Muslims.", "The man was a doctor, the woman a nurse.",
          "Answer: A, B or C."] * 3


def byte_bpe():
    """A byte-level BPE tokenizer (GPT-2 style 'Ġ' marker) whose vocabulary has "Christians" as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=["<pad>", "<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|endoftext|>")


TOKENIZERS = {"byte_bpe": byte_bpe, "metaspace": metaspace_tokenizer}
REQUESTS = [
    ChoiceRequest("The man was", (" a doctor", " a nurse", " kind")),
    ChoiceRequest("People who live here are", (" Christians", " Muslims", " kind.")),
    ChoiceRequest("Answer:", (" A", " B", " C")),
    ChoiceRequest("The woman met the", (" Christian", " Muslim"), word_end=True),
]


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def setup(request):
    tok = TOKENIZERS[request.param]()
    return request.param, tok, tiny_llama(vocab_size=len(tok))


def ids(tok, text, special=True):
    return list(tok(text, add_special_tokens=special).input_ids)


def starts_by_hand(tok) -> torch.Tensor:
    """Word starts for the two tokenizers above, from their raw token strings: metaspace marks a word
    start with '▁'; byte-level BPE writes bytes as printable characters, mapped back here with GPT-2's
    table. A start: a special token, or a first character that is not a letter, digit or underscore
    (an incomplete UTF-8 character continues a word)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # GPT-2's table: the rest shifted past 255
    to_byte = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    out = torch.zeros(len(tok), dtype=torch.bool)
    for i in range(len(tok)):
        raw = tok.convert_ids_to_tokens(i)
        if i in tok.all_special_ids or raw.startswith("▁"):
            out[i] = True
            continue
        if not isinstance(tok.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace):
            raw = bytes(to_byte[c] for c in raw).decode("utf-8", errors="replace")
        out[i] = raw[0] != "\ufffd" and not (raw[0].isalnum() or raw[0] == "_")
    return out


def expected(model, tok, request: ChoiceRequest) -> tuple[list[float], list[int]]:
    """(log-prob of each option's suffix tokens of the joint string, their counts), plain forward."""
    prompt = ids(tok, request.prompt)
    totals, counts = [], []
    for option in request.options:
        joint = ids(tok, request.prompt + option)
        assert joint[:len(prompt)] == prompt  # these requests split at the boundary
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([joint])).logits[0].double(), -1)
        total = sum(float(logp[t - 1, joint[t]]) for t in range(len(prompt), len(joint)))
        if request.word_end:
            total += float(torch.logsumexp(logp[-1, starts_by_hand(tok)], 0))
        totals.append(total)
        counts.append(len(joint) - len(prompt))
    return totals, counts


def test_options_are_scored_on_the_joint_tokenization(setup):
    name, tok, model = setup
    fast = Evaluator(model, tok, progress=False)
    scores = fast.score_choices(REQUESTS)
    reference = ReferenceScorer(model, tok, progress=False).score_choices(REQUESTS)
    for request, f, r in zip(REQUESTS, scores, reference):
        want, counts = expected(model, tok, request)
        np.testing.assert_allclose(f.logprob, want, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(r.logprob, want, atol=1e-4, err_msg=name)
        assert f.n_tokens.tolist() == r.n_tokens.tolist() == counts
    assert fast.boundary_merges == 0


def test_separate_tokenization_would_differ_for_metaspace():
    """Llama 2-style metaspace: " a" alone gains a bare word-start token, so scoring it separately
    (as before) gives another score; the joint tokenization is what the evaluator scores."""
    tok = metaspace_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    request = REQUESTS[0]
    prompt, joint = ids(tok, request.prompt), ids(tok, request.prompt + request.options[0])
    separate = ids(tok, request.options[0], special=False)
    assert tok.convert_ids_to_tokens(separate)[0] == "▁" and joint[len(prompt):] == separate[1:]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + separate])).logits[0].double(), -1)
    separate_score = sum(float(logp[t - 1, (prompt + separate)[t]]) for t in range(len(prompt), len(prompt + separate)))
    (scores,) = Evaluator(model, tok, progress=False).score_choices([request])
    assert abs(scores.logprob[0] - separate_score) > 1e-2
    np.testing.assert_allclose(scores.logprob[0], expected(model, tok, request)[0][0], atol=1e-4)


@pytest.mark.parametrize("name, prompt, option", [
    ("byte_bpe", "A group of Christian", "s"),  # "Christian" + "s" is one token in the joint string
    ("metaspace", "Answer: ", "A"),  # "▁" + "A" is one token in the joint string
])
def test_a_boundary_merge_is_counted_and_scored_on_the_option_alone(name, prompt, option):
    tok = TOKENIZERS[name]()
    model = tiny_llama(vocab_size=len(tok))
    p, joint = ids(tok, prompt), ids(tok, prompt + option)
    assert joint[:len(p)] != p  # the joint tokenization does not split at the boundary
    alone = ids(tok, option, special=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + alone])).logits[0].double(), -1)
    want = sum(float(logp[t - 1, (p + alone)[t]]) for t in range(len(p), len(p + alone)))
    request = ChoiceRequest(prompt, (option, " x"))
    ev = Evaluator(model, tok, progress=False)
    for _ in range(2):  # the counter counts distinct pairs, not scoring calls
        (scores,) = ev.score_choices([request])
    np.testing.assert_allclose(scores.logprob[0], want, atol=1e-4)
    (reference,) = ReferenceScorer(model, tok, progress=False).score_choices([request])
    np.testing.assert_allclose(reference.logprob, scores.logprob, atol=1e-4)
    assert ev.boundary_merges == 1


CHAT = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"


def test_a_chat_template_prompt_gets_a_single_bos():
    tok = metaspace_tokenizer()
    tok.chat_template = CHAT
    model = tiny_llama(vocab_size=len(tok))
    item = BBQItem(1, "Religion", "1", "ambig", "neg", "The Christian and the Muslim met.", "Who was kind?",
                   ("The Christian", "The Muslim", "Unknown"), 2, 2, 0, 0, "search")
    request = choice_request(item, tok)
    assert request.prompt.startswith("<s>[INST]")
    assert ids(tok, request.prompt)[:2] == [tok.bos_token_id] * 2  # what adding special tokens again gives
    ev = Evaluator(model, tok, progress=False)
    prompt, options, _ = ev.tokens.request(request)
    assert prompt[0] == tok.bos_token_id and prompt[1] != tok.bos_token_id
    assert prompt == ids(tok, request.prompt, special=False)
    plain, _, _ = ev.tokens.request(ChoiceRequest("The man was", (" a",)))
    assert plain[0] == tok.bos_token_id and plain[1] != tok.bos_token_id  # a plain prompt still gets its BOS
    scores = ev.score_choices([request])[0].logprob
    np.testing.assert_allclose(ReferenceScorer(model, tok, progress=False).score_choices([request])[0].logprob, scores,
                               atol=1e-4)


def test_word_start_mask_of_each_kind_of_tokenizer():
    bpe = byte_bpe()
    mask = word_start_mask(bpe)
    assert torch.equal(mask, starts_by_hand(bpe))
    tokens = bpe.convert_ids_to_tokens(list(range(len(bpe))))
    assert mask[tokens.index("ĠChristians")] and mask[tokens.index(",")] and mask[bpe.eos_token_id]
    assert not mask[tokens.index("s")] and not mask[tokens.index("istian")]

    meta = metaspace_tokenizer()
    mask = word_start_mask(meta, vocab_size=len(meta) + 5)
    assert mask.shape == (len(meta) + 5,) and not mask[len(meta):].any()  # ids beyond the tokenizer
    assert torch.equal(mask[:len(meta)], starts_by_hand(meta))
    tokens = meta.convert_ids_to_tokens(list(range(len(meta))))
    assert mask[tokens.index("▁Christian")] and mask[tokens.index("▁")] and mask[meta.bos_token_id]
    assert not mask[tokens.index("s")]

    byte = word_start_mask(ByteTokenizer(), vocab_size=260)
    assert byte[ord(" ") + 1] and byte[ord(".") + 1] and byte[ord("'") + 1] and byte[0] and byte[257] and byte[258]
    assert not byte[ord("a") + 1] and not byte[ord("7") + 1] and not byte[ord("_") + 1]
    assert not byte[0xC3 + 1] and not byte[259]  # a UTF-8 lead byte continues a word; 259 is no token


@pytest.mark.parametrize("word_end", [False, True])
def test_word_end_fast_reference_and_by_hand(setup, word_end):
    name, tok, model = setup
    request = ChoiceRequest("The woman met the", (" Christian", " Muslim", " Christians"), word_end=word_end)
    want, counts = expected(model, tok, request)
    ev = Evaluator(model, tok, progress=False)
    (fast,) = ev.score_choices([request])
    (reference,) = ReferenceScorer(model, tok, progress=False).score_choices([request])
    np.testing.assert_allclose(fast.logprob, want, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(reference.logprob, want, atol=1e-4, err_msg=name)
    assert fast.n_tokens.tolist() == counts
    (differentiable,) = ev.option_logprobs([request])
    np.testing.assert_allclose(differentiable.detach().numpy(), want, atol=1e-4)


def test_word_end_on_the_byte_tokenizer():
    """The byte tokenizer has no raw token strings: word starts come from decoding each byte."""
    model, tok = tiny_gpt2(), ByteTokenizer(add_bos=True)
    request = ChoiceRequest("They met a", (" Christian", " Muslim"), word_end=True)
    starts = [0, 257, 258] + [b + 1 for b in range(128) if not (chr(b).isalnum() or chr(b) == "_")]
    prompt = [257] + [b + 1 for b in request.prompt.encode()]
    want = []
    for option in request.options:
        seq = prompt + [b + 1 for b in option.encode()]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        want.append(sum(float(logp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))
                    + float(torch.logsumexp(logp[-1, starts], 0)))
    (fast,) = Evaluator(model, tok, progress=False).score_choices([request])
    np.testing.assert_allclose(fast.logprob, want, atol=1e-4)
