"""A contiguous span of decoder blocks [start, end) that runs with or without a KV cache."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from blocks.attention import ATTENTION
from blocks.checkpoint import Checkpoint, read_block_state
from blocks.families import family_of, layer_types
from blocks.quantization import quantize_linear_layers

logger = logging.getLogger(__name__)
_MASK_MAKERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class BlockSpan(nn.Module):
    """Decoder layers [start, end) of a model plus the rotary embedding they share.

    Layers are transformers' own classes. Each layer keeps its global index for per-layer settings (e.g. Qwen2's
    sliding-window layers) but reads and writes the cache at its local index, so a session's cache holds just
    this span.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: list[nn.Module]):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers or len(layers) != end - start:
            raise ValueError(f"bad span [{start}, {end}) for a model of {config.num_hidden_layers} blocks")
        self.config = config
        self.start, self.end = start, end
        self.layers = nn.ModuleList(layers)
        self.layer_types = layer_types(config)[start:end]
        self.rotary_emb = family_of(config).rotary_embedding(config=config)
        for local_idx, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = local_idx
        # Config describing just this span, so DynamicCache builds one (possibly sliding) layer per local block.
        self.span_config = copy.copy(config)
        self.span_config.num_hidden_layers = end - start
        if getattr(config, "layer_types", None):
            self.span_config.layer_types = self.layer_types

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (quantized weights keep their own storage types)."""
        return self.layers[0].input_layernorm.weight.dtype

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.span_config)

    def attention_masks(
        self, hidden: torch.Tensor, cache: Cache | None, positions: torch.Tensor, first: int, last: int
    ) -> dict[str, Any]:
        """transformers' causal (and sliding-window) masks for layers [first, last) of the span, one per kind of
        attention they use: the one place that builds them, for a request alone and for each session of a batch
        (blocks.batching), so both always see the same masks."""
        masks = {}
        for kind, make_mask in _MASK_MAKERS.items():
            if kind in self.layer_types[first:last]:
                # Take mask sizes from this kind's first cache layer that the request actually uses.
                layer_idx = first + self.layer_types[first:last].index(kind)
                masks[kind] = make_mask(
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=None,
                    cache=cache,
                    position_ids=positions,
                    layer_idx=layer_idx if cache is not None else None,
                )
        return masks

    def forward(
        self,
        hidden: torch.Tensor,
        cache: DynamicCache | None = None,
        position_offset: int = 0,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: the whole span) on hidden [batch, tokens, hidden_size].

        The tokens sit at positions position_offset.. of every sequence; with a cache, it must hold exactly
        position_offset earlier tokens for these blocks (and receives the new ones).
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are outside this span [{self.start}, {self.end})")
        first, last = start - self.start, end - self.start
        if cache is not None:
            check_cache_lengths(cache, first, last, position_offset, "before")
        positions = torch.arange(position_offset, position_offset + hidden.shape[1], device=hidden.device).unsqueeze(0)
        masks = self.attention_masks(hidden, cache, positions, first, last)
        position_embeddings = self.rotary_emb(hidden, position_ids=positions)
        for i in range(first, last):
            hidden = self.layers[i](
                hidden,
                attention_mask=masks[self.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
            )
        if cache is not None:
            check_cache_lengths(cache, first, last, position_offset + hidden.shape[1], "after")
        return hidden


class CacheLengthError(RuntimeError):
    """A KV cache layer does not hold the tokens it should: attention would silently see the wrong past."""


def check_cache_lengths(cache: DynamicCache, first: int, last: int, expected: int, when: str) -> None:
    """Layers [first, last) of `cache` hold exactly `expected` tokens each (checked before and after a step, so a
    change in how transformers' layers use the cache raises instead of computing something else)."""
    if len(cache.layers) < last:
        raise CacheLengthError(f"the cache has {len(cache.layers)} layers, the span needs {last}")
    for i in range(first, last):
        held = cache.layers[i].get_seq_length()
        if held != expected:
            raise CacheLengthError(
                f"{when} a step, cache layer {i} holds {held} tokens where {expected} were expected "
                f"(transformers {transformers.__version__})"
            )


def serving_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of the model config that runs attention through transformers' SDPA attention, per session when
    several sessions run as one batch (blocks.attention; causal masks are built as for SDPA)."""
    config = copy.copy(config)
    config._attn_implementation = ATTENTION
    return config


def load_block(
    ckpt: Checkpoint,
    index: int,
    dtype: torch.dtype,
    quant: str = "none",
    device: str = "cpu",
    config: PretrainedConfig | None = None,
) -> nn.Module:
    """One decoder layer with the checkpoint's weights, built without a throwaway random init."""
    config = config if config is not None else serving_config(ckpt.config)
    with torch.device("meta"):
        layer = family_of(config).decoder_layer(config, index)
    state = read_block_state(ckpt, index, dtype)
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"block {index}: missing tensors {missing}, unexpected tensors {unexpected}")
    layer = layer.to(device=device, dtype=dtype)
    if quant != "none":
        layer = quantize_linear_layers(layer, quant, compute_dtype=dtype, device=device)
    return layer.eval().requires_grad_(False)


def load_span(
    ckpt: Checkpoint,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    quant: str = "none",
    device: str = "cpu",
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> BlockSpan:
    config = serving_config(ckpt.config)
    if not 0 <= start < end <= ckpt.num_blocks:
        raise ValueError(f"blocks [{start}, {end}) are not inside the model's {ckpt.num_blocks} blocks")
    layers = []
    for index in tqdm(range(start, end), desc=f"loading blocks {start}:{end}", disable=not progress):
        layers.append(load_block(ckpt, index, dtype, quant, device, config))
        if on_block is not None:
            on_block(index)
    return BlockSpan(config, start, end, layers).to(device)
