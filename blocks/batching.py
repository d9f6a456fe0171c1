"""One forward of a span over several inference sessions at once: iteration-level batching.

Each session (a *segment*) brings its new tokens ([batch, tokens, hidden]), its own KV cache and its position.
Their token rows are laid one after another in a single sequence, so that every token-wise part of transformers'
own decoder layers (norms, the q/k/v/o projections, the MLP) runs once for all sessions: the weights are read
once per step instead of once per session, which is what bounds decoding speed. Rotary embeddings get each token's
own position. Attention stays per session (blocks.attention): the SegmentCache below appends each session's new
keys and values to that session's cache and hands the attention function each session's full keys and values,
and each session gets the causal mask it would get alone. A session therefore computes what it computes alone, up
to the rounding of a matrix product over more rows (float32: ~1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from blocks.attention import SEGMENT_KV, SEGMENT_PLAN, rows_of
from blocks.span import BlockSpan, check_cache_lengths


@dataclass(frozen=True)
class Segment:
    """One session's part of a batch: `batch` x `tokens` new tokens at `position`, appended to `cache`."""

    cache: DynamicCache
    batch: int
    tokens: int
    position: int

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@dataclass
class SegmentPlan:
    """What the attention function needs: the segments, each layer's kind, and per kind one mask per segment."""

    segments: list[Segment]
    layer_kinds: list[str]
    masks: dict[str, list[Any]] = field(default_factory=dict)


class SegmentCache(Cache):
    """The cache the layers see during a batched step. ``update`` receives the new keys and values of every
    session side by side, appends each session's part to that session's own cache, and passes each session's full
    keys and values on to the attention function (through the call's kwargs, as transformers' paged cache does)."""

    def __init__(self, segments: list[Segment]):
        super().__init__(layers=[])
        self.segments = segments

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        call_kwargs = kwargs.get("kwargs")
        if call_kwargs is None:
            raise RuntimeError("a batched step needs the attention call's kwargs: this transformers version differs")
        full, offset = [], 0
        for segment in self.segments:
            keys = rows_of(key_states, offset, segment.batch, segment.tokens)
            values = rows_of(value_states, offset, segment.batch, segment.tokens)
            full.append(segment.cache.update(keys, values, layer_idx))
            offset += segment.rows
        call_kwargs[SEGMENT_KV] = full
        return key_states, value_states


def _segment_masks(span: BlockSpan, hidden: torch.Tensor, segment: Segment, first: int, last: int) -> dict[str, Any]:
    """The masks this session gets when it runs alone (BlockSpan.attention_masks, as BlockSpan.forward uses it)."""
    like = hidden.new_empty(segment.batch, segment.tokens, hidden.shape[-1])
    positions = torch.arange(segment.position, segment.position + segment.tokens, device=hidden.device)[None]
    return span.attention_masks(like, segment.cache, positions, first, last)


def run_segments(
    span: BlockSpan, inputs: list[torch.Tensor], segments: list[Segment], start: int, end: int
) -> list[torch.Tensor]:
    """Blocks [start, end) of `span` on each session's hidden states `inputs[i]` ([batch_i, tokens_i, hidden]), with
    its cache; returns each session's output. Every cache must hold exactly its segment's `position` tokens."""
    if len(inputs) != len(segments) or not segments:
        raise ValueError(f"{len(inputs)} inputs for {len(segments)} segments")
    first, last = start - span.start, end - span.start
    for x, segment in zip(inputs, segments, strict=True):
        if tuple(x.shape[:2]) != (segment.batch, segment.tokens):
            raise ValueError(f"input {list(x.shape)} does not match its segment {segment}")
        check_cache_lengths(segment.cache, first, last, segment.position, "before")
    hidden = torch.cat([x.reshape(1, -1, x.shape[-1]) for x in inputs], dim=1)
    positions = torch.cat(
        [torch.arange(s.position, s.position + s.tokens, device=hidden.device).repeat(s.batch) for s in segments]
    )[None]
    plan = SegmentPlan(segments, span.layer_types)
    per_segment = [_segment_masks(span, hidden, s, first, last) for s in segments]
    plan.masks = {kind: [m[kind] for m in per_segment] for kind in per_segment[0]}
    position_embeddings = span.rotary_emb(hidden, position_ids=positions)
    cache = SegmentCache(segments)
    for i in range(first, last):
        hidden = span.layers[i](
            hidden,
            attention_mask=None,
            position_embeddings=position_embeddings,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **{SEGMENT_PLAN: plan},
        )
    outputs, offset = [], 0
    for x, segment in zip(inputs, segments, strict=True):
        outputs.append(hidden[0, offset : offset + segment.rows].reshape(x.shape))
        offset += segment.rows
        check_cache_lengths(segment.cache, first, last, segment.position + segment.tokens, "after")
    return outputs
