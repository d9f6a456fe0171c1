"""Route planning on the current view: the pure route searches of swarm.routing, applied to the latest snapshot
minus the peers the client must avoid, waiting a bounded time for the swarm to cover the blocks."""

from __future__ import annotations

import logging
import random
import time
from typing import Literal

from hivemind.p2p import PeerID

from swarm.config import ClientConfig
from swarm.health import PeerHealth
from swarm.routing import (
    NoRouteError,
    RouteSpan,
    excluded_peers,
    fewest_hops_route,
    min_latency_route,
    throughput_weighted_route,
)
from swarm.swarm_view import SwarmView

logger = logging.getLogger(__name__)
RoutePolicy = Literal["latency", "throughput", "hops"]
COVERAGE_POLL_SECONDS = 0.5  # while waiting for the swarm to cover the blocks


class RoutePlanner:
    """Routes over blocks of the view's model that avoid banned, blocked and not-allowed peers."""

    def __init__(self, view: SwarmView, health: PeerHealth, config: ClientConfig):
        self.view, self.health, self.config = view, health, config
        self.allowed = None if config.allowed_peers is None else {PeerID.from_base58(p) for p in config.allowed_peers}
        self.blocked = {PeerID.from_base58(p) for p in config.blocked_peers}
        self.rng = random.Random()  # picks among replicas for throughput-weighted routes

    def make_route(
        self,
        start: int,
        end: int,
        min_length: int = 1,
        timeout: float | None = None,
        policy: RoutePolicy = "latency",
        tokens_needed: int = 0,
    ) -> list[RouteSpan]:
        """A route over blocks [start, end); waits up to `timeout` (default: the discovery timeout) for the swarm
        to cover them.

        policy "latency": least expected time per token (inference); "throughput": spread over replicas by their
        announced throughput (whole-sequence work); "hops": fewest hops.
        """
        deadline = time.monotonic() + (self.config.discovery_timeout if timeout is None else timeout)
        refresh = False
        while True:
            try:
                route = self._search(start, end, min_length, policy, tokens_needed, refresh)
                logger.debug(f"route: {[(str(s.peer_id)[-6:], s.uid) for s in route]}")
                return route
            except NoRouteError as e:
                if time.monotonic() > deadline:
                    raise NoRouteError(e.uncovered, self.view.prefix, e.min_length) from None
                time.sleep(COVERAGE_POLL_SECONDS)
                refresh = True

    def _search(
        self, start: int, end: int, min_length: int, policy: RoutePolicy, tokens_needed: int, refresh: bool
    ) -> list[RouteSpan]:
        snapshot = self.view.snapshot(refresh=refresh)
        exclude = excluded_peers(snapshot, self.allowed, self.blocked, self.health.banned())
        if policy == "latency":
            return min_latency_route(
                snapshot,
                start,
                end,
                rtt=self.health.rtt(),
                default_rtt=self.config.default_rtt,
                exclude=exclude,
                min_length=min_length,
                tokens_needed=tokens_needed,
                full_cache_penalty=self.config.full_cache_penalty,
            )
        if policy == "throughput":
            return throughput_weighted_route(snapshot, start, end, rng=self.rng, exclude=exclude, min_length=min_length)
        return fewest_hops_route(snapshot, start, end, exclude=exclude, min_length=min_length)
