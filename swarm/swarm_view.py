"""The client's connection to the swarm and its view of it: the DHT node, the P2P handle and event-loop thread,
and the latest snapshot of who serves which blocks, kept fresh in the background (with peers' round trips)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID

from blocks.fingerprint import ModelWeights
from dht.announce import fetch_block_servers
from dht.node import start_dht_node
from dht.records import with_weights
from swarm.config import ClientConfig
from swarm.health import PeerHealth
from swarm.routing import PeerSpan, SwarmSnapshot
from swarm.transport import LoopThread, PeerError, call_info

logger = logging.getLogger(__name__)


class SwarmView:
    """Snapshots of the swarm under `prefix` (a model of `num_blocks` blocks).

    A background thread re-reads the DHT every `refresh_period` and probes the round trip of the least recently
    measured peers (into `health`), so that routes are planned on a current view with measured latencies and no
    DHT lookup sits on the generation path; without it, a snapshot older than `snapshot_ttl` is re-read lazily.
    The same probes find out which announced peers can be reached at all: new peers are probed at once, and
    unreachable ones again once their backoff has run out (PeerHealth), all concurrently.
    With `weights` (the client's fingerprints of its model's blocks), only peers whose records announce the same
    weights for their span are in the view (dht.records.with_weights).
    """

    def __init__(
        self,
        config: ClientConfig,
        prefix: str,
        num_blocks: int,
        health: PeerHealth,
        weights: ModelWeights | None = None,
    ):
        self.config, self.prefix, self.num_blocks, self.health = config, prefix, num_blocks, health
        self.weights = weights
        self.other_weights: set[PeerID] = set()  # peers left out of the view: they serve other weights
        self.dht = start_dht_node(
            config.initial_peers,
            config.host_maddrs,
            # Signatures only: this client-mode node stores and serves nothing, and every record it reads is checked
            # again by explicit code (dht.records.parse_block_entries, the same schema); a second schema check in
            # the DHT process was half the cost of reading many records (e.g. of announced peers that do not run).
            record_validators=[RSASignatureValidator()],
            client_mode=True,
        )
        self.loop = LoopThread()
        self.p2p: P2P = self.loop.run(self.dht.replicate_p2p())
        self._snapshot: SwarmSnapshot | None = None
        self._snapshot_time = 0.0
        self._probes: dict[PeerID, asyncio.Task] = {}  # probes in flight (touched on the loop only)
        self._probe_limit = asyncio.Semaphore(max(config.max_probes, 1))  # probes in flight at most
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if config.refresh_period > 0:
            self._refresher = threading.Thread(target=self._refresh_loop, name="blockswarm-refresh", daemon=True)
            self._refresher.start()

    def snapshot(self, refresh: bool = False) -> SwarmSnapshot:
        """The latest view of the swarm; kept fresh by the background refresh, or fetched when it is too old."""
        if refresh or self._snapshot is None or time.monotonic() - self._snapshot_time > self.config.snapshot_ttl:
            servers = fetch_block_servers(self.dht, self.prefix, range(self.num_blocks))
            if self.weights is not None:
                servers, dropped = with_weights(servers, self.weights.span, self.config.require_weights_fingerprint)
                for peer_id in dropped - self.other_weights:
                    logger.warning(f"not using peer {peer_id}: it serves other weights than this model's")
                self.other_weights |= dropped
            self._snapshot = SwarmSnapshot.from_servers(self.num_blocks, servers)
            self._snapshot_time = time.monotonic()
        return self._snapshot

    def peer(self, peer_id: PeerID) -> PeerSpan | None:
        """What the latest snapshot says of a peer (no DHT read: routes are planned on that snapshot)."""
        snapshot = self._snapshot
        return None if snapshot is None else snapshot.peers.get(peer_id)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.refresh_period):
            try:
                snapshot = self.snapshot(refresh=True)
                self.probe_rtts(list(snapshot.peers))
            except Exception as e:  # the next round tries again; routes fall back to a lazy lookup meanwhile
                logger.debug(f"background refresh failed: {e}")

    def probe_rtts(self, peers: list[PeerID]) -> None:
        """Probe the peers never tried, the unreachable ones whose backoff has run out, and the least recently
        measured of the reachable ones (at most max_probes of those): an info call each, concurrently."""
        health = self.health
        unreachable = health.unreachable_peers()
        reachable = [p for p in peers if p in health.reached() and p not in unreachable]
        chosen = health.never_tried(peers) + health.due_for_reprobe(peers)
        chosen += health.least_recently_measured(reachable, self.config.max_probes)
        self.probe(chosen, wait=self.config.probe_timeout)

    def probing(self) -> set[PeerID]:
        """Peers whose probe is in flight."""
        return set(self._probes)

    def probe(self, peers: list[PeerID], wait: float, enough: Callable[[], bool] | None = None) -> None:
        """Probe `peers` (those not being probed already), all at once, and wait until every probe of them is done,
        at most `wait` s; once `enough()` holds, at most as long again as it took until then. Probes still running
        go on: their answers count when they come."""
        if self._stop.is_set() or not peers:
            return
        try:  # a backstop: the loop may be busy elsewhere (borrowed by a generation in another thread)
            self.loop.run(self._probe_wait(list(dict.fromkeys(peers)), wait, enough), timeout=wait + 5)
        except TimeoutError:
            logger.debug(f"probes of {len(peers)} peer(s) still running after {wait + 5:.1f} s")

    async def _probe_wait(self, peers: list[PeerID], wait: float, enough: Callable[[], bool] | None) -> None:
        loop = asyncio.get_running_loop()
        pending = set()
        for peer_id in peers:
            task = self._probes.get(peer_id)
            if task is None:
                task = self._probes[peer_id] = asyncio.create_task(self._probe(peer_id))
                task.add_done_callback(lambda _, p=peer_id: self._probes.pop(p, None))
            pending.add(task)
        began = loop.time()
        deadline = began + wait
        waited_for_enough = enough is None
        while pending and (remaining := deadline - loop.time()) > 0:
            _, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if pending and not waited_for_enough and enough():
                waited_for_enough = True
                deadline = min(deadline, loop.time() + (loop.time() - began))

    async def _probe(self, peer_id: PeerID) -> None:
        """One info call. No answer: the peer is unreachable (kept out of routes until a probe answers), except
        that a timeout of a peer that did answer before is left to the failover path (a busy peer is not gone)."""
        async with self._probe_limit:
            if self._stop.is_set():
                return
            began = time.perf_counter()
            try:
                await call_info(self.p2p, peer_id, self.config.probe_timeout)
            except PeerError as e:
                if not (isinstance(e.__cause__, asyncio.TimeoutError) and peer_id in self.health.reached()):
                    logger.debug(f"probe failed: {e}")
                    self.health.unreachable(peer_id)
                return
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
