"""Explicit checks of everything a client sends to a peer. Each failure is a ProtocolError naming the problem."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blocks.adapters import DEEP_PROMPTS, parse_lora_name
from peers.wire.codec import all_finite, within
from peers.wire.framing import LimitExceeded, ProtocolError

MAX_LORA_SCALE = 1e4


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
    max_backward_tokens: int
    max_lora_rank: int
    max_prompt_length: int
    max_held_tokens: int
    train_hold_timeout: float
    # Largest magnitude of any value a client sends: far above real activations and gradients, far enough below
    # float32's 3.4e38 that squares (norms) and sums stay finite; beyond it a request would compute infinities.
    max_abs_value: float = 1e9

    @property
    def max_numel(self) -> int:
        return self.max_message_bytes // 2  # the smallest wire dtype has 2-byte elements


def request_sizes(batch: int, tokens: int) -> dict[str, int]:
    """What each size limit (a field of Limits) measures of a request of `batch` sequences of `tokens` tokens: the
    peer checks requests with it, the client cuts its batches and judges a peer's refusals by it."""
    return {
        "max_batch": batch,
        "max_length": tokens,
        "max_forward_tokens": batch * tokens,
        "max_backward_tokens": batch * tokens,
    }


def _check_limit(setting: str, sizes: dict[str, int], limits: Limits, detail: str) -> None:
    """LimitExceeded (its size as request_sizes measures it) if the request is over limits.<setting>."""
    limit = getattr(limits, setting)
    if sizes[setting] > limit:
        raise LimitExceeded(setting, limit, sizes[setting], detail)


def check_session_size(batch: int, max_length: int, limits: Limits) -> None:
    """An inference session's batch and length must be within the peer's limits (LimitExceeded, an error of the
    request that the client does not hold against the peer)."""
    sizes = request_sizes(batch, max_length)
    _check_limit("max_batch", sizes, limits, f"a session of batch size {batch} is over this peer's limit")
    _check_limit("max_length", sizes, limits, f"a session of {max_length} tokens is over this peer's max length")


def check_span(start: int, end: int, limits: Limits) -> tuple[int, int]:
    """A requested sub-span must lie inside the span this peer serves."""
    if not limits.start <= start < end <= limits.end:
        raise ProtocolError(
            f"blocks [{start}, {end}) are not served here: this peer serves blocks [{limits.start}, {limits.end})"
        )
    return start, end


def parse_span_uid(uid: str, limits: Limits) -> tuple[int, int]:
    parts = uid.split(":")
    # isascii: str.isdigit also accepts superscripts and other scripts' digits, which int() then refuses
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
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
    _check_limit(
        "max_batch", request_sizes(b, t), limits, f"batch size {b} exceeds this peer's limit of {limits.max_batch}"
    )
    if batch is not None and b != batch:
        raise ProtocolError(f"this session was opened with batch size {batch}, got {b}")
    check_values(hidden, "hidden states", limits)
    return hidden


def check_values(tensor: torch.Tensor, what: str, limits: Limits) -> None:
    """Finite, and no value beyond limits.max_abs_value (one pass for valid input: the range check also fails
    on NaN and infinity; finiteness is only checked again to name the problem)."""
    if tensor.numel() == 0 or within(tensor, limits.max_abs_value):
        return
    if not all_finite(tensor):
        raise ProtocolError(f"{what} contain NaN or infinite values")
    raise ProtocolError(f"{what} contain values beyond +-{limits.max_abs_value:g} (max_abs_value)")


def check_forward_size(hidden: torch.Tensor, limits: Limits) -> None:
    b, t, _ = hidden.shape
    sizes = request_sizes(b, t)
    limit = limits.max_length
    _check_limit("max_length", sizes, limits, f"sequence of {t} tokens exceeds this peer's max length of {limit}")
    limit = limits.max_forward_tokens
    _check_limit(
        "max_forward_tokens", sizes, limits, f"forward of {b}x{t} tokens exceeds this peer's limit of {limit} tokens"
    )


def check_backward_size(hidden: torch.Tensor, grad: torch.Tensor, limits: Limits) -> None:
    """A backward recomputes the span with autograd: its own (smaller) token limit, and the output gradient must
    match the input hidden states."""
    check_forward_size(hidden, limits)
    if grad.shape != hidden.shape or grad.dtype != hidden.dtype:
        raise ProtocolError(
            f"output gradient {list(grad.shape)} {grad.dtype} does not match hidden states "
            f"{list(hidden.shape)} {hidden.dtype}"
        )
    b, t, _ = hidden.shape
    limit = limits.max_backward_tokens
    detail = f"backward of {b}x{t} tokens exceeds this peer's limit of {limit} tokens"
    _check_limit("max_backward_tokens", request_sizes(b, t), limits, detail)
    check_values(grad, "output gradients", limits)


def check_lora_scale(scale: Any) -> float:
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ProtocolError("metadata field 'lora_scale' must be a finite number")
    if abs(scale) > MAX_LORA_SCALE:
        raise ProtocolError(f"metadata field 'lora_scale'={scale} exceeds {MAX_LORA_SCALE}")
    return float(scale)


def check_adapters(
    names: Any,
    tensors: list[torch.Tensor],
    hidden: torch.Tensor,
    start: int,
    end: int,
    limits: Limits,
    linear_shape: Callable[[int, str], tuple[int, int]],
) -> dict[str, torch.Tensor]:
    """Client-sent deep prompts and LoRA tensors for blocks [start, end) of a request on `hidden`.

    `names` (from metadata field 'adapters') names each tensor; see blocks.adapters for their meaning. Each is
    either shared (no batch dim) or per example (leading dim = the batch). `linear_shape(block, module)` gives a
    target module's (in_features, out_features). Returns name -> tensor, in the order sent.
    """
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("metadata field 'adapters' must be a list of strings")
    if len(names) != len(tensors):
        raise ProtocolError(f"{len(names)} adapter names for {len(tensors)} adapter tensors")
    if len(set(names)) != len(names):
        raise ProtocolError("adapter tensor names must be unique")
    batch, tokens = hidden.shape[0], hidden.shape[1]
    result: dict[str, torch.Tensor] = {}
    lora_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in zip(names, tensors, strict=True):
        if tensor.dtype != hidden.dtype:
            raise ProtocolError(f"{name[:40]!r}: dtype {tensor.dtype} differs from the hidden states' {hidden.dtype}")
        if name == DEEP_PROMPTS:
            _check_prompts(tensor, batch, tokens, end - start, limits)
        else:
            parsed = parse_lora_name(name)
            if parsed is None:
                raise ProtocolError(f"unknown adapter tensor {name[:40]!r} (or a LoRA module not allowed)")
            block, module, part = parsed
            if not start <= block < end:
                raise ProtocolError(f"{name}: block {block} is not in the requested blocks [{start}, {end})")
            parts = lora_parts.setdefault((block, module), {})
            if part in parts:  # e.g. 'lora.3...' and 'lora.03...': the second would replace the first, unchecked
                raise ProtocolError(f"{name[:40]!r}: a second LoRA {part} of block {block} {module}")
            parts[part] = tensor
        check_values(tensor, f"{name[:40]!r}:", limits)
        result[name] = tensor
    for (block, module), parts in lora_parts.items():
        _check_lora_pair(block, module, parts, batch, limits, linear_shape(block, module))
    return result


def _check_prompts(prompts: torch.Tensor, batch: int, tokens: int, n_blocks: int, limits: Limits) -> None:
    expected_lead = [n_blocks] if prompts.ndim == 3 else [batch, n_blocks]
    if prompts.ndim not in (3, 4) or list(prompts.shape[:-2]) != expected_lead:
        raise ProtocolError(
            f"deep prompts must be [{n_blocks}, P, hidden] or [{batch}, {n_blocks}, P, hidden], "
            f"got {list(prompts.shape)}"
        )
    length, hidden_size = prompts.shape[-2:]
    if hidden_size != limits.hidden_size:
        raise ProtocolError(f"deep prompts have hidden size {hidden_size}, expected {limits.hidden_size}")
    if not 1 <= length <= min(tokens, limits.max_prompt_length):
        raise ProtocolError(
            f"deep prompt length {length} must be in [1, min(tokens={tokens}, limit={limits.max_prompt_length})]"
        )


def _check_lora_pair(
    block: int, module: str, parts: dict[str, torch.Tensor], batch: int, limits: Limits, shape: tuple[int, int]
) -> None:
    if set(parts) != {"A", "B"}:
        raise ProtocolError(f"LoRA of block {block} {module} needs both A and B")
    a, b = parts["A"], parts["B"]
    in_features, out_features = shape
    per_example = a.ndim == 3
    lead = [batch] if per_example else []
    if a.ndim not in (2, 3) or b.ndim != a.ndim:
        raise ProtocolError(f"LoRA of block {block} {module}: A and B must both be 2-D (shared) or 3-D (per example)")
    rank = a.shape[-2]
    if not 1 <= rank <= limits.max_lora_rank:
        raise ProtocolError(f"LoRA rank {rank} of block {block} {module} is outside [1, {limits.max_lora_rank}]")
    if list(a.shape) != [*lead, rank, in_features] or list(b.shape) != [*lead, out_features, rank]:
        raise ProtocolError(
            f"LoRA of block {block} {module}: A {list(a.shape)} and B {list(b.shape)} do not fit "
            f"A {[*lead, rank, in_features]}, B {[*lead, out_features, rank]}"
        )
