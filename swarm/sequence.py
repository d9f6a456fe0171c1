"""The client's view of the remote blocks: discovery through the DHT, routes, and calls along a route."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID

from blocks.adapters import select_tensors
from dht.announce import fetch_block_servers
from dht.node import start_dht_node
from dht.records import check_prefix, make_validators
from privacy.exposure import ExposureKind, ExposureLedger
from swarm.autograd import SpanCalls, apply_span
from swarm.config import ClientConfig
from swarm.routing import (
    NoRouteError,
    RouteSpan,
    SwarmSnapshot,
    excluded_peers,
    fewest_hops_route,
    min_latency_route,
    throughput_weighted_route,
)
from swarm.transport import LoopThread, PeerError, call_info

logger = logging.getLogger(__name__)
RTT_SMOOTHING = 0.2  # weight of a new round-trip sample in the moving average


class RemoteSequence:
    """Blocks [remote_start, remote_end) of one model of `num_blocks` blocks, served by the swarm under `prefix`
    (the rest, if any, run on the client: ClientConfig.local_blocks)."""

    def __init__(
        self,
        config: ClientConfig,
        prefix: str,
        num_blocks: int,
        hidden_size: int,
        remote_blocks: range | None = None,
    ):
        self.config, self.prefix = config, check_prefix(prefix)
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        remote_blocks = range(num_blocks) if remote_blocks is None else remote_blocks
        self.remote_start, self.remote_end = remote_blocks.start, remote_blocks.stop
        self.ledger = ExposureLedger()  # every request that showed a peer some of our activations
        self.calls = SpanCalls(self)
        self.dht = start_dht_node(
            config.initial_peers,
            config.host_maddrs,
            record_validators=make_validators(prefix, num_blocks, RSASignatureValidator()),
            client_mode=True,
        )
        self.loop = LoopThread()
        self.p2p: P2P = self.loop.run(self.dht.replicate_p2p())
        self._snapshot: SwarmSnapshot | None = None
        self._snapshot_time = 0.0
        self._allowed = None if config.allowed_peers is None else {PeerID.from_base58(p) for p in config.allowed_peers}
        self._blocked = {PeerID.from_base58(p) for p in config.blocked_peers}
        self._failures: dict[PeerID, int] = {}
        self._rtt: dict[PeerID, float] = {}
        self._rtt_time: dict[PeerID, float] = {}  # when each peer's RTT was last measured (monotonic)
        self.rng = random.Random()  # picks among replicas for throughput-weighted routes
        self._banned_until: dict[PeerID, float] = {}
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if config.refresh_period > 0:
            self._refresher = threading.Thread(target=self._refresh_loop, name="blockswarm-refresh", daemon=True)
            self._refresher.start()

    # ---- discovery ----

    def snapshot(self, refresh: bool = False) -> SwarmSnapshot:
        """The latest view of the swarm; kept fresh by the background refresh, or fetched when it is too old."""
        if refresh or self._snapshot is None or time.monotonic() - self._snapshot_time > self.config.snapshot_ttl:
            servers = fetch_block_servers(self.dht, self.prefix, range(self.num_blocks))
            self._snapshot = SwarmSnapshot.from_servers(self.num_blocks, servers)
            self._snapshot_time = time.monotonic()
        return self._snapshot

    def _refresh_loop(self) -> None:
        """Re-read the DHT and probe peers' round trips in the background, so that a route is planned on a current
        view with measured latencies, without a DHT lookup on the generation path."""
        while not self._stop.wait(self.config.refresh_period):
            try:
                snapshot = self.snapshot(refresh=True)
                self.probe_rtts(list(snapshot.peers))
            except Exception as e:  # the next round tries again; routes fall back to a lazy lookup meanwhile
                logger.debug(f"background refresh failed: {e}")

    def probe_rtts(self, peers: list[PeerID]) -> None:
        """Measure the round trip to the least recently measured peers (an info call each, concurrently)."""
        if self._stop.is_set():
            return
        banned = self.banned()
        peers = sorted((p for p in peers if p not in banned), key=lambda p: self._rtt_time.get(p, 0.0))
        peers = peers[: self.config.max_probes]
        if peers:
            self.loop.run(self._probe_all(peers), timeout=self.config.probe_timeout + 5)

    async def _probe_all(self, peers: list[PeerID]) -> None:
        await asyncio.gather(*(self._probe(p) for p in peers))

    async def _probe(self, peer_id: PeerID) -> None:
        began = time.perf_counter()
        try:
            await call_info(self.p2p, peer_id, self.config.probe_timeout)
        except PeerError:
            return  # a peer that does not answer a probe is left to the failover path, which sees real failures
        self.observe_rtt(peer_id, time.perf_counter() - began)

    # ---- peers that failed ----

    def ban(self, peer_id: PeerID) -> float:
        """Avoid a peer that failed, for a backoff that doubles with each failure in a row; returns its length."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        backoff = min(self.config.ban_seconds * 2 ** (failures - 1), self.config.max_ban_seconds)
        self._banned_until[peer_id] = time.monotonic() + backoff
        logger.info(f"avoiding peer {peer_id} for {backoff:.0f} s after {failures} failure(s) in a row")
        return backoff

    def succeeded(self, peer_id: PeerID) -> None:
        """A peer answered: its next failure starts the backoff from the beginning again."""
        if self._failures:
            self._failures.pop(peer_id, None)

    def failures_in_a_row(self, peer_id: PeerID) -> int:
        return self._failures.get(peer_id, 0)

    def banned(self) -> set[PeerID]:
        now = time.monotonic()
        return {peer for peer, until in self._banned_until.items() if until > now}

    def observe_rtt(self, peer_id: PeerID, seconds: float) -> None:
        """Fold a measured network round trip to a peer into its moving average (used by latency routing)."""
        previous = self._rtt.get(peer_id)
        self._rtt[peer_id] = seconds if previous is None else (1 - RTT_SMOOTHING) * previous + RTT_SMOOTHING * seconds
        self._rtt_time[peer_id] = time.monotonic()

    def rtt(self) -> dict[PeerID, float]:
        return dict(self._rtt)

    def make_route(
        self,
        min_length: int = 1,
        start: int | None = None,
        end: int | None = None,
        timeout: float | None = None,
        policy: str = "latency",
        tokens_needed: int = 0,
    ) -> list[RouteSpan]:
        """A route over blocks [start, end) avoiding banned, blocked and not-allowed peers; waits up to `timeout`
        (default: the discovery timeout) for the swarm to cover them.

        policy "latency": least expected time per token (inference); "throughput": spread over replicas by their
        announced throughput (whole-sequence work); "hops": fewest hops.
        """
        start = self.remote_start if start is None else start
        end = self.remote_end if end is None else end
        deadline = time.monotonic() + (self.config.discovery_timeout if timeout is None else timeout)
        refresh = False
        while True:
            try:
                snapshot = self.snapshot(refresh=refresh)
                exclude = excluded_peers(snapshot, self._allowed, self._blocked, self.banned())
                if policy == "latency":
                    route = min_latency_route(
                        snapshot,
                        start,
                        end,
                        rtt=self._rtt,
                        default_rtt=self.config.default_rtt,
                        exclude=exclude,
                        min_length=min_length,
                        tokens_needed=tokens_needed,
                        full_cache_penalty=self.config.full_cache_penalty,
                    )
                elif policy == "throughput":
                    route = throughput_weighted_route(
                        snapshot, start, end, rng=self.rng, exclude=exclude, min_length=min_length
                    )
                else:
                    route = fewest_hops_route(snapshot, start, end, exclude=exclude, min_length=min_length)
                logger.debug(f"route: {[(str(s.peer_id)[-6:], s.uid) for s in route]}")
                return route
            except NoRouteError as e:
                if time.monotonic() > deadline:
                    raise NoRouteError(e.uncovered, self.prefix, e.min_length) from None
                time.sleep(0.5)
                refresh = True

    # ---- whole-sequence forward ----

    def record_exposure(self, span: RouteSpan, tokens: int, kind: ExposureKind, *also: ExposureLedger) -> None:
        for ledger in (self.ledger, *also):
            ledger.record(span.peer_id.to_base58(), span.start, span.end, tokens, kind)

    def forward(
        self, hidden: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None, lora_scale: float = 1.0
    ) -> torch.Tensor:
        """Run the remote blocks on hidden [batch, seq, hidden_size] (no cache), with the client's deep prompts
        (`tensors["deep_prompts"]`, indexed by global block) and LoRA tensors; differentiable (see swarm.autograd).
        A failed peer's span is re-run elsewhere."""
        tensors = tensors or {}
        block, failures = self.remote_start, 0
        while block < self.remote_end:
            timeout = None if failures == 0 else self.config.failover_timeout
            span = self.make_route(min_length=hidden.shape[1], start=block, timeout=timeout, policy="throughput")[0]
            try:
                sub = select_tensors(tensors, span.start, span.end, prompt_key="deep_prompts")
                hidden = apply_span(self.calls, span, hidden, sub, lora_scale)
            except PeerError as e:
                failures += 1
                if failures > self.config.max_failovers:
                    raise
                logger.warning(f"forward through blocks {span.uid} failed ({e}); trying another peer")
                self.ban(span.peer_id)
                continue
            self.succeeded(span.peer_id)
            block = span.end
        return hidden

    def shutdown(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=self.config.probe_timeout + 10)
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.loop.stop()
        self.dht.shutdown()
