"""Route planning on the current view: the pure route searches of swarm.routing, applied to the latest snapshot
minus the peers the client must avoid, waiting a bounded time for the swarm to cover the blocks.

Claims count only after they are observed: a peer is routed through only once it has answered (new peers are
probed first, all at once, for at most ClientConfig.reach_timeout), and with the throughput the client can vouch
for (swarm.routing.routing_throughputs), not the one it announces."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Literal

from hivemind.p2p import PeerID

from swarm.config import ClientConfig
from swarm.health import PeerHealth
from swarm.limits import batch_refusal, too_small_for_batch
from swarm.routing import (
    NoRouteError,
    RouteSpan,
    SwarmSnapshot,
    capped_claims,
    excluded_peers,
    fewest_hops_route,
    min_latency_route,
    routing_throughputs,
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
        # extra routing cost per peer (s) for latency routes, e.g. swarm.spot_checks' preference for checked peers
        self.penalties: Callable[[], Mapping[PeerID, float]] | None = None
        self._capped: set[PeerID] = set()  # peers whose capped claim was logged already

    def make_route(
        self,
        start: int,
        end: int,
        min_length: int = 1,
        timeout: float | None = None,
        policy: RoutePolicy = "latency",
        tokens_needed: int = 0,
        min_batch: int = 1,
    ) -> list[RouteSpan]:
        """A route over blocks [start, end); waits up to `timeout` (default: the discovery timeout) for the swarm
        to cover them. Peers announcing a max batch below `min_batch` (an inference session's batch, which cannot
        be cut) are left out; RequestTooLargeError at once if only they serve some block.

        policy "latency": least expected time per token (inference); "throughput": spread over replicas by their
        announced throughput (whole-sequence work); "hops": fewest hops.
        """
        deadline = time.monotonic() + (self.config.discovery_timeout if timeout is None else timeout)
        refresh = False
        while True:
            try:
                route = self._search(start, end, min_length, policy, tokens_needed, refresh, min_batch)
                logger.debug(f"route: {[(str(s.peer_id)[-6:], s.uid) for s in route]}")
                return route
            except NoRouteError as e:
                if time.monotonic() > deadline:
                    raise NoRouteError(e.uncovered, self.view.prefix, e.min_length) from None
                # Meanwhile ask again the peers that have not answered (their backoff permitting).
                began = time.monotonic()
                candidates = self._candidates(self.view.snapshot())
                again = self.health.never_tried(candidates) + self.health.due_for_reprobe(candidates)
                self.view.probe(again, wait=COVERAGE_POLL_SECONDS)
                time.sleep(max(0.0, COVERAGE_POLL_SECONDS - (time.monotonic() - began)))
                refresh = True

    def _search(
        self,
        start: int,
        end: int,
        min_length: int,
        policy: RoutePolicy,
        tokens_needed: int,
        refresh: bool,
        min_batch: int = 1,
    ) -> list[RouteSpan]:
        snapshot = self.view.snapshot(refresh=refresh)
        exclude = excluded_peers(snapshot, self.allowed, self.blocked, self.health.banned())
        self._reach(snapshot, exclude, start, end, min_length)
        exclude |= self.not_answered(snapshot)
        if min_batch > 1:
            small = too_small_for_batch(snapshot, min_batch)
            uncovered = snapshot.uncovered(start, end, exclude | small, min_length)
            refusal = batch_refusal(snapshot, min_batch, uncovered, exclude) if uncovered else None
            if refusal is not None:
                raise refusal
            exclude |= small
        snapshot = self._observed(snapshot)
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
                penalty=self.penalties() if self.penalties is not None else None,
            )
        if policy == "throughput":
            return throughput_weighted_route(snapshot, start, end, rng=self.rng, exclude=exclude, min_length=min_length)
        return fewest_hops_route(snapshot, start, end, exclude=exclude, min_length=min_length)

    def _candidates(self, snapshot: SwarmSnapshot) -> list[PeerID]:
        """Peers of the snapshot a route may use as far as bans and allow / block lists go."""
        exclude = excluded_peers(snapshot, self.allowed, self.blocked, self.health.banned())
        return [p for p in snapshot.peers if p not in exclude]

    def not_answered(self, snapshot: SwarmSnapshot) -> set[PeerID]:
        """Peers of the snapshot that never answered, or could not be reached since they last did."""
        reached = self.health.reached()
        return {p for p in snapshot.peers if p not in reached} | self.health.unreachable_peers()

    def _reach(self, snapshot: SwarmSnapshot, exclude: set[PeerID], start: int, end: int, min_length: int) -> None:
        """Probe the candidates never tried, all at once, and wait for their answers: at most reach_timeout, and
        once the peers that answered cover the blocks, at most as long again. So any number of announced peers that
        do not answer delays a route by at most min(reach_timeout, twice the time the real ones take to answer)."""
        new = self.health.never_tried([p for p in snapshot.peers if p not in exclude])
        if not new:
            return

        def enough() -> bool:
            return not snapshot.uncovered(start, end, exclude | self.not_answered(snapshot), min_length)

        self.view.probe(new, wait=self.config.reach_timeout, enough=enough)

    def _observed(self, snapshot: SwarmSnapshot) -> SwarmSnapshot:
        """The snapshot with the throughputs routes may count on; a claim far above what the client measured is
        logged once per peer."""
        cfg, rates = self.config, self.health.block_rates()
        for peer_id, (claimed, measured) in capped_claims(snapshot, rates, cfg.max_claim_ratio).items():
            if peer_id not in self._capped:
                self._capped.add(peer_id)
                logger.warning(
                    f"peer {peer_id} announces {claimed:.1f} tokens/s but was seen doing {measured:.1f}: "
                    f"counting it at most {cfg.max_claim_ratio:g}x that"
                )
        throughputs = routing_throughputs(
            snapshot, rates, self.health.reached(), cfg.unmeasured_throughput, cfg.max_claim_ratio
        )
        return snapshot.with_throughputs(throughputs)
