"""Where a causal LM keeps its parts, across architectures: one table, as in repeng's layer finder.

Interventions hook named modules: head masking the attention output projection (its input is the
concatenated head outputs), neutralisers and steering the MLP output or the block output. Rather than
architecture checks scattered over the code, every place is listed once below as dotted attribute
paths, tried in order; the first that exists wins. A model none of them fits is refused with one line
naming its class. Extending the tool to a new family means adding its paths here and its tiny config
to tests/test_architectures.py.
"""
from __future__ import annotations

from torch import nn

from repair.errors import UserError

PATHS: dict[str, tuple[str, ...]] = {
    # the list of decoder blocks, from the CausalLM
    "layers": (
        "model.layers",  # Llama, Mistral, Qwen2, Gemma 1-3 (text), Phi, Phi3, Cohere, Granite, SmolLM
        "model.language_model.layers",  # Gemma3ForConditionalGeneration and other multimodal wrappers
        "model.decoder.layers",  # OPT
        "transformer.h",  # GPT-2, GPT-J, GPT-Neo, Falcon, Bloom, GPT-BigCode
        "transformer.blocks",  # MPT
        "gpt_neox.layers",  # GPT-NeoX, Pythia
    ),
    # a block's attention output projection (input: the concatenated per-head outputs)
    "attention_output": (
        "self_attn.o_proj",  # Llama, Mistral, Qwen2, Gemma, Phi3, Cohere, Granite
        "self_attn.out_proj",  # OPT
        "self_attn.dense",  # Phi
        "self_attention.dense",  # Falcon, Bloom
        "attention.dense",  # GPT-NeoX
        "attn.c_proj",  # GPT-2, GPT-BigCode (GPT-2's is a transposed Conv1D)
        "attn.out_proj",  # GPT-J, MPT
        "attn.attention.out_proj",  # GPT-Neo
    ),
    # the module whose output is a block's MLP output, before it joins the residual stream
    "mlp_output": (
        "mlp.dense_4h_to_h",  # Bloom (BloomMLP itself returns output + residual), Falcon, GPT-NeoX
        "mlp",  # Llama, Mistral, Qwen2, Gemma, Phi, Phi3, Cohere, Granite, GPT-2, GPT-J, GPT-Neo
        "fc2",  # OPT (no MLP module: fc1/fc2 sit in the block)
        "ffn",  # MPT
    ),
    # the final norm before the output layer, from the CausalLM
    "final_norm": (
        "model.norm",  # Llama, Mistral, Qwen2, Gemma, Phi3, Cohere, Granite
        "model.language_model.norm",  # multimodal wrappers
        "model.final_layernorm",  # Phi
        "model.decoder.final_layer_norm",  # OPT
        "transformer.ln_f",  # GPT-2, GPT-J, GPT-Neo, Falcon, Bloom, GPT-BigCode
        "transformer.norm_f",  # MPT
        "gpt_neox.final_layer_norm",  # GPT-NeoX
    ),
}

SUPPORTED = "a Llama-, Gemma-, Qwen-, Phi-, Cohere-, Granite-, GPT-2-, GPT-NeoX-, OPT- or Falcon-like model"


def text_config(model):
    """The config of the model's text decoder (multimodal wrappers such as Gemma 3 nest it)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def get_path(obj, dotted: str):
    """obj.a.b.c for "a.b.c", or None where any step is missing."""
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def unsupported(model, what: str, purpose: str = "this tool") -> UserError:
    return UserError(f"{type(model).__name__}: {purpose} does not support this architecture ({what}); "
                     f"use another --method, or {SUPPORTED}")


def _find(obj, role: str, want) -> nn.Module | None:
    for path in PATHS[role]:
        module = get_path(obj, path)
        if want(module):
            return module
    return None


def decoder_layers(model: nn.Module, purpose: str = "this tool") -> list[nn.Module]:
    """The model's decoder blocks, in order."""
    layers = _find(model, "layers", lambda m: isinstance(m, nn.ModuleList) and len(m) > 0)
    if layers is None:
        raise unsupported(model, "no list of decoder blocks found", purpose)
    return list(layers)


def attention_output(layer: nn.Module, model: nn.Module | None = None, purpose: str = "this tool") -> nn.Module:
    """A block's attention output projection: an nn.Linear, or GPT-2's Conv1D."""
    module = _find(layer, "attention_output", lambda m: isinstance(m, nn.Module) and hasattr(m, "weight"))
    if module is None:
        raise unsupported(model if model is not None else layer, "no attention output projection found in its blocks",
                          purpose)
    return module


def mlp_output(layer: nn.Module, model: nn.Module | None = None, purpose: str = "this tool") -> nn.Module:
    """The module whose forward output is a block's MLP output (hook its output to change it)."""
    module = _find(layer, "mlp_output", lambda m: isinstance(m, nn.Module))
    if module is None:
        raise unsupported(model if model is not None else layer, "no MLP found in its blocks", purpose)
    return module


def final_norm(model: nn.Module, purpose: str = "this tool") -> nn.Module:
    """The norm applied to the last block's output before the output layer."""
    module = _find(model, "final_norm", lambda m: isinstance(m, nn.Module))
    if module is None:
        raise unsupported(model, "no final norm found", purpose)
    return module
