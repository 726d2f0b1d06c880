"""Tiny random models built from configs and a byte tokenizer, so that no test needs a download."""
from __future__ import annotations

from types import SimpleNamespace

import torch


class ByteTokenizer:
    """Token id = byte value + 1 (0 is padding); a BOS id 257 is prepended when special tokens are asked for."""

    bos_token_id = 257
    pad_token_id = 0
    eos_token_id = 258
    chat_template = None

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens: bool = True):
        ids = [b + 1 for b in text.encode("utf-8")]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids):
        return bytes(i - 1 for i in ids if 0 < i < 257).decode("utf-8", "replace")


def tiny_llama(seed: int = 0, **overrides):
    """A random Llama with grouped-query attention, built from a config, for tests and benchmarks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=257, eos_token_id=258)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides):
    """A random GPT-2 built from a config, for tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=260, n_embd=64, n_layer=3, n_head=4, n_positions=512, bos_token_id=257, eos_token_id=258)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def byte_bpe_tokenizer(text=("The man and the woman were a doctor and a nurse.", "People who live here are kind.")):
    """A real, saveable byte-level BPE tokenizer (vocab < 260) trained in milliseconds on a few lines
    (other lines give other merges: another tokenizer of the same size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(text), trainers.BpeTrainer(vocab_size=259, special_tokens=["<pad>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")


def tiny_checkpoint(folder, make=tiny_llama, **overrides):
    """Save a tiny random model with a real tokenizer, loadable by `--model folder`."""
    tok = byte_bpe_tokenizer()
    model = make(vocab_size=len(tok), **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# family -> (config class, model class, config kwargs): tiny random models of every architecture the
# tool is tested on, each with its post-head logit transform set so that it bites.
_SMALL = dict(vocab_size=260, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, bos_token_id=257, eos_token_id=258, pad_token_id=0)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_SMALL, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=260, n_embd=48, n_layer=2, n_head=4, n_positions=512,
                                                   bos_token_id=257, eos_token_id=258)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_SMALL, num_key_value_heads=2, head_dim=16,
                                                         final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
                                                         sliding_window=6)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_SMALL, num_key_value_heads=2, head_dim=16,
                                                             final_logit_softcapping=2.0, sliding_window=6,
                                                             layer_types=["sliding_attention", "full_attention"])),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, num_key_value_heads=2, sliding_window=6)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_SMALL)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=260, hidden_size=48, ffn_dim=96, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=48, max_position_embeddings=512,
                                                bos_token_id=257, eos_token_id=258, pad_token_id=0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_SMALL, num_key_value_heads=2, logit_scale=0.3)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_SMALL, num_key_value_heads=2, logits_scaling=4.0)),
}


def tiny_causal_lm(family: str, seed: int = 0, **overrides):
    """A random model of `family` (a key of FAMILIES) from a tiny config: 2 layers, hidden 48, vocab 260."""
    import transformers

    config_cls, model_cls, cfg = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**cfg, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def metaspace_tokenizer(vocab_size: int = 200):
    """A real SentencePiece-style tokenizer as Llama 2's tokenizer.json has it: the normalizer turns
    spaces into the word-start marker '▁' and prepends one to every text (so a separately encoded
    " a" becomes '▁' + '▁a', unlike " a" inside a sentence), merges stay within words, a BOS is
    added; trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    text = ["The man and the woman were a doctor and a nurse.", "People who live here are kind.",
            "Answer: A, B or C. The Christian and the Muslim met a Christians group."]
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
