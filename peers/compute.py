"""Where and when a peer computes: one computation at a time, small ones on the event loop, large ones on a thread."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ComputeScheduler:
    """Runs the peer's computations one at a time, in arrival order.

    A computation of at most `inline_tokens` tokens (a decode step: about a millisecond) runs right on the event
    loop, where handing it to another thread and back would cost two thread wake-ups, a large share of a step on a
    busy machine; larger ones run on a dedicated compute thread, so that the loop keeps reading requests and
    answering info calls meanwhile.
    """

    def __init__(self, inline_tokens: int):
        self.inline_tokens = inline_tokens
        self.compute_seconds = 0.0
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    async def run(self, fn: Callable[[], T], tokens: int, check: Callable[[], None] | None = None) -> T:
        """`fn()` once it is this computation's turn; `check()` runs first, when the turn has come (e.g. to refuse
        work for blocks the peer stopped serving while the request waited)."""
        async with self._lock:
            if check is not None:
                check()
            if tokens <= self.inline_tokens:
                return self._timed(fn)
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """No computation runs while the block is open (e.g. while the peer swaps its blocks)."""
        async with self._lock:
            yield

    def _timed(self, fn: Callable[[], T]) -> T:
        began = time.perf_counter()
        try:
            return fn()
        finally:
            self.compute_seconds += time.perf_counter() - began

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
