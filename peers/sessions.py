"""Server-side inference sessions: each holds its own KV cache, reserved against the peer's token budget."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from transformers.cache_utils import DynamicCache

from blocks.adapters import Adapters
from peers.wire.framing import ProtocolError


class CacheFullError(ProtocolError):
    """Not enough KV-cache budget left for a new session; the client should try another peer."""


class TooManySessionsError(ProtocolError):
    pass


class CacheBudget:
    """Token budget for KV caches (batch x max_length per session, summed). Thread-safe."""

    def __init__(self, total_tokens: int, max_sessions: int):
        self.total_tokens, self.max_sessions = total_tokens, max_sessions
        self._used, self._sessions = 0, 0
        self._lock = threading.Lock()

    @property
    def tokens_left(self) -> int:
        with self._lock:
            return self.total_tokens - self._used

    @property
    def sessions(self) -> int:
        with self._lock:
            return self._sessions

    def reserve(self, tokens: int) -> None:
        with self._lock:
            if self._sessions >= self.max_sessions:
                raise TooManySessionsError(f"this peer already runs its limit of {self.max_sessions} sessions")
            if self._used + tokens > self.total_tokens:
                raise CacheFullError(
                    f"session needs {tokens} cache tokens but only {self.total_tokens - self._used} of "
                    f"{self.total_tokens} are free"
                )
            self._used += tokens
            self._sessions += 1

    def release(self, tokens: int) -> None:
        with self._lock:
            self._used -= tokens
            self._sessions -= 1


_session_ids = itertools.count()


@dataclass
class PeerSession:
    """One client's generation state on this peer: blocks [start, end), its own cache, its position."""

    start: int
    end: int
    batch: int
    max_length: int
    cache: DynamicCache
    position: int = 0
    last_active: float = field(default_factory=time.monotonic)
    session_id: int = field(default_factory=lambda: next(_session_ids))
    # the client's deep prompts / LoRA for these blocks, sent once when the session opens
    adapters: Adapters = field(default_factory=Adapters)

    @property
    def reserved_tokens(self) -> int:
        return self.batch * self.max_length

    def prepare_step(self, position: int, new_tokens: int) -> None:
        """Check a step that writes `new_tokens` at `position`; a position behind the cache rewinds it."""
        if position > self.position:
            raise ProtocolError(f"step at position {position}, but this session holds only {self.position} tokens")
        if position + new_tokens > self.max_length:
            raise ProtocolError(
                f"step would grow the session to {position + new_tokens} tokens, over its max_length {self.max_length}"
            )
        if position < self.position:
            # A negative argument removes that many tokens (transformers 5 rejects a positive target length, and
            # crop(0) would be a no-op there).
            try:
                self.cache.crop(position - self.position)
            except (RuntimeError, ValueError) as e:  # e.g. a sliding-window layer that already dropped those tokens
                raise ProtocolError(f"cannot rewind this session from {self.position} to {position} tokens: {e}") from e
            self.position = position
        self.last_active = time.monotonic()
