"""The attention implementation that peers' spans run with: transformers' own SDPA attention, per sequence.

Registered with transformers' AttentionInterface (and its mask interface) under ``ATTENTION``. On an ordinary
call it is exactly ``sdpa_attention_forward``. When several inference sessions run as one batch
(``blocks.batching``), their tokens sit side by side in one row and each session's keys and values come from its
own cache; the batch's SegmentCache hands them here in ``segment_kv``, and attention runs once per session, with
that session's queries, keys, values and mask, through the same SDPA function. Nothing of attention is
re-implemented: only the split by session is ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "blockswarm_sdpa"
SEGMENT_KV = "segment_kv"  # per session (keys, values) of this layer, [batch_i, kv_heads, length_i, head_dim]
SEGMENT_PLAN = "segment_plan"  # the batch's SegmentPlan (blocks.batching)


def rows_of(flat: torch.Tensor, offset: int, batch: int, tokens: int) -> torch.Tensor:
    """[1, heads, total, d] -> this session's [batch, heads, tokens, d] (its rows lie one after another)."""
    part = flat[:, :, offset : offset + batch * tokens]
    return part.reshape(part.shape[1], batch, tokens, part.shape[3]).transpose(0, 1)


def segment_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    segment_kv = kwargs.pop(SEGMENT_KV, None)
    plan = kwargs.pop(SEGMENT_PLAN, None)
    if segment_kv is None or plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    masks = plan.masks[plan.layer_kinds[module.layer_idx]]
    outputs, offset = [], 0
    for segment, (keys, values), mask in zip(plan.segments, segment_kv, masks, strict=True):
        q = rows_of(query, offset, segment.batch, segment.tokens)
        out, _ = sdpa_attention_forward(module, q, keys, values, mask, dropout=dropout, scaling=scaling, **kwargs)
        outputs.append(out.reshape(1, segment.batch * segment.tokens, *out.shape[2:]))  # [B, T, heads, d] rows
        offset += segment.batch * segment.tokens
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(ATTENTION, segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
