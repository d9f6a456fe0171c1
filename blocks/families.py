"""Which transformers classes implement each supported model family.

Peers and clients reuse transformers' own decoder layers, norms and rotary embeddings: a family is only a table
of those classes, so adding one (e.g. another Llama-like architecture) is a single entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one blockswarm can serve."""


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    norm: type[nn.Module]
    pretrained_base: type  # the family's PreTrainedModel, for weight init and config handling
    causal_lm: type  # the family's local *ForCausalLM, used as the client's base class


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(
        "llama",
        modeling_llama.LlamaDecoderLayer,
        modeling_llama.LlamaRotaryEmbedding,
        modeling_llama.LlamaRMSNorm,
        modeling_llama.LlamaPreTrainedModel,
        modeling_llama.LlamaForCausalLM,
    ),
    "mistral": ModelFamily(
        "mistral",
        modeling_mistral.MistralDecoderLayer,
        modeling_mistral.MistralRotaryEmbedding,
        modeling_mistral.MistralRMSNorm,
        modeling_mistral.MistralPreTrainedModel,
        modeling_mistral.MistralForCausalLM,
    ),
    "qwen2": ModelFamily(
        "qwen2",
        modeling_qwen2.Qwen2DecoderLayer,
        modeling_qwen2.Qwen2RotaryEmbedding,
        modeling_qwen2.Qwen2RMSNorm,
        modeling_qwen2.Qwen2PreTrainedModel,
        modeling_qwen2.Qwen2ForCausalLM,
    ),
}


def family_of(config: PretrainedConfig) -> ModelFamily:
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is None:
        raise UnsupportedModelError(f"model_type {config.model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return family


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention type of every layer ("full_attention" / "sliding_attention"), as transformers defines it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    # No layer_types (e.g. Mistral): every layer uses the sliding window if the config sets one, as MistralModel does.
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers
