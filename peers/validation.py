"""Explicit checks of everything a client sends to a peer. Each failure is a ProtocolError naming the problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peers.protocol import ProtocolError


@dataclass(frozen=True)
class Limits:
    """The request limits a peer enforces (from PeerConfig), plus the facts of the span it serves."""

    start: int
    end: int
    hidden_size: int
    max_length: int
    max_batch: int
    max_forward_tokens: int
    max_message_bytes: int

    @property
    def max_numel(self) -> int:
        return self.max_message_bytes // 2  # the smallest wire dtype has 2-byte elements


def check_span(start: int, end: int, limits: Limits) -> tuple[int, int]:
    """A requested sub-span must lie inside the span this peer serves."""
    if not limits.start <= start < end <= limits.end:
        raise ProtocolError(
            f"blocks [{start}, {end}) are not served here: this peer serves blocks [{limits.start}, {limits.end})"
        )
    return start, end


def parse_span_uid(uid: str, limits: Limits) -> tuple[int, int]:
    parts = uid.split(":")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise ProtocolError(f"span must look like 'start:end', got {uid[:40]!r}")
    return check_span(int(parts[0]), int(parts[1]), limits)


def check_hidden(hidden: torch.Tensor, limits: Limits, *, batch: int | None = None) -> torch.Tensor:
    """Hidden states must be [batch, tokens, hidden_size], finite, within the batch limit."""
    if hidden.ndim != 3:
        raise ProtocolError(f"hidden states must have 3 dimensions [batch, tokens, hidden], got {hidden.ndim}")
    b, t, h = hidden.shape
    if h != limits.hidden_size:
        raise ProtocolError(f"hidden size must be {limits.hidden_size}, got {h}")
    if b < 1 or t < 1:
        raise ProtocolError(f"hidden states must be non-empty, got shape {list(hidden.shape)}")
    if b > limits.max_batch:
        raise ProtocolError(f"batch size {b} exceeds this peer's limit of {limits.max_batch}")
    if batch is not None and b != batch:
        raise ProtocolError(f"this session was opened with batch size {batch}, got {b}")
    if not torch.isfinite(hidden).all():
        raise ProtocolError("hidden states contain NaN or infinite values")
    return hidden


def check_forward_size(hidden: torch.Tensor, limits: Limits) -> None:
    b, t, _ = hidden.shape
    if t > limits.max_length:
        raise ProtocolError(f"sequence of {t} tokens exceeds this peer's max length of {limits.max_length}")
    if b * t > limits.max_forward_tokens:
        raise ProtocolError(
            f"forward of {b}x{t} tokens exceeds this peer's limit of {limits.max_forward_tokens} tokens"
        )
