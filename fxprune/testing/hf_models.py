"""Tiny random HuggingFace models, one table for every family :mod:`fxprune.hf` is tested on.

The HF tests (widths, depth, experts, budget, options, the CLI's ``hf:`` route) build their models from
this one table, so a family's configuration is written once: 32 hidden units, 4 heads (2 KV heads for
the decoders), 64 intermediate units, a vocabulary of 100, and the layer count each test asks for.

>>> model = tiny_model("mixtral", layers=4)                                      # doctest: +SKIP
>>> model.config.num_local_experts, model.config.num_hidden_layers              # doctest: +SKIP
(4, 4)

transformers is imported when a model is built, never when this module is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

VOCAB = 100
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
EXPERTS = dict(num_experts=4, num_experts_per_tok=2)


@dataclass(frozen=True)
class Family:
    """A transformers model class, its config class and the config's fields (less the layer count)."""

    model: str
    config: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    layers: str = "num_hidden_layers"
    """The config field of the layer count (GPT-2: ``n_layer``)."""


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "LlamaConfig", DECODER),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", DECODER),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config", {**DECODER, "head_dim": 8}),  # QK-norm
    "mistral": Family("MistralForCausalLM", "MistralConfig", DECODER),
    "phi3": Family("Phi3ForCausalLM", "Phi3Config", DECODER),  # fused qkv_proj / gate_up_proj
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2Config", {**DECODER, "head_dim": 8}),  # alternating layer_types
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_positions=64,
                                                          bos_token_id=1, eos_token_id=2), layers="n_layer"),
    "bert": Family("BertForMaskedLM", "BertConfig", dict(vocab_size=VOCAB, max_position_embeddings=64, **ENCODER)),
    "vit": Family("ViTForImageClassification", "ViTConfig", dict(image_size=16, patch_size=4, num_labels=3,
                                                                 **ENCODER)),
    # routed experts as 3-D parameters (fxprune/core/rules/moe.py)
    "mixtral": Family("MixtralForCausalLM", "MixtralConfig", {**DECODER, "num_local_experts": 4,
                                                              "num_experts_per_tok": 2}),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {**DECODER, **EXPERTS, "moe_intermediate_size": 48,
                                                                  "shared_expert_intermediate_size": 40}),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {**DECODER, **EXPERTS, "moe_intermediate_size": 48}),
    "olmoe": Family("OlmoeForCausalLM", "OlmoeConfig", {**DECODER, **EXPERTS}),
}
#: The families with routed experts, and the config field of their expert count.
EXPERT_FIELDS = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
                 "olmoe": "num_experts"}


def tiny_config(name: str, layers: int = 2, **fields: Any) -> Any:
    """The config of family ``name`` with ``layers`` layers and ``fields`` changed."""
    import transformers
    family = FAMILIES[name]
    return getattr(transformers, family.config)(**{**family.fields, family.layers: layers, **fields})


def tiny_model(name: str, layers: int = 2, seed: int = 0, **fields: Any) -> Any:
    """A random model of family ``name`` (weights from ``seed``), in eval mode."""
    import torch
    import transformers
    config = tiny_config(name, layers, **fields)
    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[name].model)(config).eval()


__all__ = ["VOCAB", "DECODER", "ENCODER", "Family", "FAMILIES", "EXPERT_FIELDS", "tiny_config", "tiny_model"]
