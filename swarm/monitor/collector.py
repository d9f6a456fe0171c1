"""The monitor's look at the swarm: registry and block records from the DHT, a round-trip probe of each peer.

The monitor is a client-mode DHT node: it stores nothing and serves no records, it only reads. Every record is
validated by explicit code (dht.models / dht.records) before it is used; peer text is never interpreted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID

from dht.announce import fetch_block_servers
from dht.models import fetch_models, registry_validator
from dht.node import start_dht_node
from peers.wire import PeerInfo
from swarm.monitor.config import MonitorConfig
from swarm.monitor.metrics import MonitorMetrics
from swarm.monitor.state import (
    History,
    ModelInfo,
    ModelView,
    PeerView,
    Probe,
    ScrapeInfo,
    Snapshot,
    block_coverage,
    connection_kind,
    coverage_timeline,
    effective_state,
    group_by_peer,
    peer_histories,
    reported_count,
    resolve_models,
)
from swarm.monitor.store import HistoryStore
from swarm.transport import LoopThread, PeerError, call_info

logger = logging.getLogger(__name__)
PROBE_CALLS = 2  # the first call may include dialing the peer; the faster of the two is the round trip


class Monitor:
    """Owns the DHT client, the probe loop and the history; `latest()` is safe to call from any thread."""

    def __init__(self, config: MonitorConfig, store: HistoryStore):
        self.config, self.store = config, store
        self.dht = start_dht_node(
            config.initial_peers,
            config.host_maddrs,
            identity_path=config.identity_path,
            # the signature validator strips signatures from values; the schema drops malformed registry entries
            record_validators=[RSASignatureValidator(), registry_validator()],
            client_mode=True,
        )
        self.loop = LoopThread("swarm-monitor-p2p")
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.metrics = MonitorMetrics(self.latest)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._snapshot

    # ---- one look at the swarm ----

    def scrape_once(self) -> Snapshot:
        started = time.time()
        began = time.perf_counter()
        error = None
        try:
            models = self._collect(started)
            self.store.record(started, models)
        except Exception as e:  # the monitor keeps running; the page and the metrics report the failure
            logger.warning(f"looking at the swarm failed: {e!r}")
            error = f"{type(e).__name__}: {e}"
            previous = self.latest()
            models = previous.models if previous is not None else []
        duration = time.perf_counter() - began
        snapshot = Snapshot(
            generated_at=time.time(),
            scrape=ScrapeInfo(started, duration, error),
            models=models,
            histories={m.info.prefix: self._history(m.info.prefix, started) for m in models},
        )
        with self._lock:
            self._snapshot = snapshot
        self.metrics.observe_scrape(started, duration, ok=error is None)
        return snapshot

    def _collect(self, now: float) -> list[ModelView]:
        c = self.config
        entries = fetch_models(self.dht, timeout=c.dht_timeout)
        known = self.store.known_models(since=now - c.history_retention)
        infos = resolve_models(entries, c.models, known, c.max_models, c.max_blocks)
        announced = {}
        for info in infos:
            if info.num_blocks is not None:
                servers = fetch_block_servers(self.dht, info.prefix, range(info.num_blocks), timeout=c.dht_timeout)
                announced[info.prefix] = group_by_peer(servers)
        to_probe = {
            peer.peer_id
            for peers in announced.values()
            for peer in peers[: c.max_peers]
            if peer.record.state == "online"
        }
        rounds = -(-len(to_probe) // c.probe_concurrency)  # each call has its own timeout: this is a backstop
        probes = self.loop.run(self._probe_all(to_probe), timeout=rounds * PROBE_CALLS * c.rtt_timeout + c.dht_timeout)
        return [self._model_view(info, announced.get(info.prefix, []), probes) for info in infos]

    def _model_view(self, info: ModelInfo, announced: list, probes: dict[str, Probe]) -> ModelView:
        views = [
            PeerView(p.peer_id, p.record, p.blocks, p.expires_at, effective_state(p.record.state, probe), probe)
            for p in announced
            for probe in [probes.get(p.peer_id)]
        ]
        coverage = block_coverage(info.num_blocks, views) if info.num_blocks is not None else []
        listed = views[: self.config.max_peers]
        return ModelView(info, listed, coverage, hidden_peers=len(views) - len(listed))

    async def _probe_all(self, peer_ids: Iterable[str]) -> dict[str, Probe]:
        limit = asyncio.Semaphore(self.config.probe_concurrency)

        async def probe(peer_id: str) -> tuple[str, float | None, str | None, PeerInfo | None]:
            async with limit:
                rtts, answer = [], None
                try:
                    for _ in range(PROBE_CALLS):
                        began = time.perf_counter()
                        answer = await call_info(self.p2p, PeerID.from_base58(peer_id), self.config.rtt_timeout)
                        rtts.append(time.perf_counter() - began)
                except PeerError as e:
                    return peer_id, None, str(e), None
                return peer_id, min(rtts), None, answer  # the batching state of the last answer: the freshest

        results = await asyncio.gather(*(probe(p) for p in peer_ids))
        # The addresses of the connections the probes just used: a relayed connection goes through /p2p-circuit.
        addrs = {info.peer_id.to_base58(): [str(a) for a in info.addrs] for info in await self.p2p.list_peers()}
        return {
            peer_id: Probe(
                rtt,
                connection_kind(addrs.get(peer_id, [])) if rtt is not None else None,
                error,
                batch_sessions=reported_count(answer.batch_sessions) if answer is not None else None,
                queue_length=reported_count(answer.queue_length) if answer is not None else None,
            )
            for peer_id, rtt, error, answer in results
        }

    def _history(self, prefix: str, now: float) -> History:
        c = self.config
        start = now - c.history_window
        samples = self.store.model_samples(prefix, since=start)
        return History(
            start=start,
            end=now,
            bucket_s=c.history_window / c.history_buckets,
            coverage=coverage_timeline(samples, start, now, c.history_buckets),
            peers=peer_histories(
                [s.t for s in samples], self.store.peer_samples(prefix, since=start), start, now, c.history_buckets
            ),
        )

    # ---- lifecycle ----

    def run(self, stop: threading.Event) -> None:
        """Look at the swarm every scrape period until `stop` is set."""
        while not stop.is_set():
            began = time.monotonic()
            self.scrape_once()
            stop.wait(max(0.0, self.config.scrape_period - (time.monotonic() - began)))

    def shutdown(self) -> None:
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:  # the DHT's own shutdown below ends the daemon anyway
            logger.debug("p2p shutdown failed", exc_info=True)
        self.loop.stop()
        self.dht.shutdown()
