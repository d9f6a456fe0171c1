"""The client's connection to the swarm and its view of it: the DHT node, the P2P handle and event-loop thread,
and the latest snapshot of who serves which blocks, kept fresh in the background (with peers' round trips)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID

from dht.announce import fetch_block_servers
from dht.node import start_dht_node
from dht.records import make_validators
from swarm.config import ClientConfig
from swarm.health import PeerHealth
from swarm.routing import SwarmSnapshot
from swarm.transport import LoopThread, PeerError, call_info

logger = logging.getLogger(__name__)


class SwarmView:
    """Snapshots of the swarm under `prefix` (a model of `num_blocks` blocks).

    A background thread re-reads the DHT every `refresh_period` and probes the round trip of the least recently
    measured peers (into `health`), so that routes are planned on a current view with measured latencies and no
    DHT lookup sits on the generation path; without it, a snapshot older than `snapshot_ttl` is re-read lazily.
    """

    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int, health: PeerHealth):
        self.config, self.prefix, self.num_blocks, self.health = config, prefix, num_blocks, health
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
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if config.refresh_period > 0:
            self._refresher = threading.Thread(target=self._refresh_loop, name="blockswarm-refresh", daemon=True)
            self._refresher.start()

    def snapshot(self, refresh: bool = False) -> SwarmSnapshot:
        """The latest view of the swarm; kept fresh by the background refresh, or fetched when it is too old."""
        if refresh or self._snapshot is None or time.monotonic() - self._snapshot_time > self.config.snapshot_ttl:
            servers = fetch_block_servers(self.dht, self.prefix, range(self.num_blocks))
            self._snapshot = SwarmSnapshot.from_servers(self.num_blocks, servers)
            self._snapshot_time = time.monotonic()
        return self._snapshot

    def _refresh_loop(self) -> None:
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
        peers = self.health.least_recently_measured(peers, self.config.max_probes)
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
        self.health.observe_rtt(peer_id, time.perf_counter() - began)

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
