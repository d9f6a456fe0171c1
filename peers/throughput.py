"""Measuring a peer's own compute speed on its own blocks at start-up (no network involved)."""

from __future__ import annotations

import statistics
import time

import torch

from blocks.span import BlockSpan


def measure_decode_throughput(span: BlockSpan, prefix_tokens: int = 16, steps: int = 8) -> float:
    """Tokens/s of single-token decoding through the whole span after a short prefix (median of `steps`)."""
    device = next(span.parameters()).device
    with torch.inference_mode():
        cache = span.new_cache()
        hidden = torch.randn(1, prefix_tokens, span.hidden_size, device=device, dtype=span.dtype)
        span(hidden, cache, 0)
        times = []
        for i in range(steps):
            step = torch.randn(1, 1, span.hidden_size, device=device, dtype=span.dtype)
            t0 = time.perf_counter()
            span(step, cache, prefix_tokens + i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return 1.0 / max(statistics.median(times), 1e-9)
