"""Measuring a peer's own compute speed on its own blocks at start-up (no network involved)."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from blocks.span import BlockSpan

logger = logging.getLogger(__name__)


def warm_up(span: BlockSpan, tokens: int = 2) -> None:
    """Run the span once on a few tokens (first-call allocations, lazy re-packing of quantized weights)."""
    device = next(span.parameters()).device
    with torch.inference_mode():
        span(torch.zeros(1, tokens, span.hidden_size, device=device, dtype=span.dtype), span.new_cache(), 0)


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


def throughput_cache_key(span: BlockSpan, model: str, quant: str, num_threads: int) -> str:
    """What the measurement depends on: the blocks' shape and number, precision, device and software."""
    device = next(span.parameters()).device
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus {num_threads or 'all'} threads"
    return json.dumps(
        [model, len(span.layers), span.hidden_size, str(span.dtype), quant, device.type, hardware, torch.__version__]
    )


def cached_throughput(path: str, key: str, measure: Callable[[], float]) -> float:
    """The throughput stored under `key` in the JSON file at `path`, or `measure()`d and stored there.

    A volunteer restarting a peer (or a peer moving to another span of the same length) does not spend start-up
    time measuring again. An unreadable cache is measured over, never fatal.
    """
    if not path:
        return measure()
    cache: dict[str, float] = {}
    try:
        loaded = json.loads(Path(path).read_text())
        if isinstance(loaded, dict):
            cache = {k: float(v) for k, v in loaded.items() if isinstance(v, int | float) and v > 0}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        logger.warning(f"ignoring unreadable throughput cache {path}: {e}")
    if key in cache:
        logger.info(f"using the cached throughput measurement from {path}")
        return cache[key]
    value = measure()
    cache[key] = value
    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, target)  # atomic: peers starting together never read half a file
    except OSError as e:
        logger.warning(f"could not save the throughput measurement to {path}: {e}")
    return value
