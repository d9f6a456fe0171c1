"""The one failover rule every remote call follows: a failed peer is banned and the work re-routed around it, at
most ``max_failovers`` times per operation, each re-route waiting at most ``failover_timeout`` for a route. A peer
that cannot be reached at all costs one bounded attempt and is kept out of routes until it answers a probe; such
failures do not use up ``max_failovers``, so an operation tries every candidate within ``failover_timeout``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from swarm.config import ClientConfig
from swarm.health import PeerHealth
from swarm.transport import PeerError, PeerUnreachableError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Failover:
    """Failures of one operation (a forward, a backward, a session opening, a generation step)."""

    def __init__(self, health: PeerHealth, config: ClientConfig, what: str):
        self.health, self.config, self.what = health, config, what
        self.failures = 0
        self.unreachable: set = set()  # peers this operation could not reach (each costs one attempt)
        self._first_failure: float | None = None  # monotonic

    @property
    def route_timeout(self) -> float | None:
        """How long the next route may wait for the swarm: the discovery default first, then failover_timeout."""
        return None if self._first_failure is None else self.config.failover_timeout

    def failed(self, error: PeerError) -> None:
        """Count a failure and ban its peer; re-raise it once the operation has failed over too often.

        A peer that could not be reached is not counted, only kept out of routes (PeerHealth.unreachable) until
        it answers a probe: the operation goes on with the other candidates, until failover_timeout has passed
        since its first failure. The same peer unreachable twice in one operation counts as a failure."""
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        if isinstance(error, PeerUnreachableError) and error.peer_id not in self.unreachable:
            if now - self._first_failure > self.config.failover_timeout:
                raise error
            self.unreachable.add(error.peer_id)
            logger.warning(f"{self.what} failed ({error}); trying other peers")
            self.health.unreachable(error.peer_id)
            return
        self.failures += 1
        if self.failures > self.config.max_failovers:
            raise error
        logger.warning(f"{self.what} failed ({error}); trying other peers")
        self.health.ban(error.peer_id)

    def run(self, attempt: Callable[[float | None], T]) -> T:
        """`attempt(route_timeout)` until it returns, failing over after each PeerError."""
        while True:
            try:
                return attempt(self.route_timeout)
            except PeerError as e:
                self.failed(e)

    async def run_async(self, attempt: Callable[[float | None], Awaitable[T]]) -> T:
        while True:
            try:
                return await attempt(self.route_timeout)
            except PeerError as e:
                self.failed(e)
