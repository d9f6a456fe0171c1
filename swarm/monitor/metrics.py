"""Prometheus exposition of the monitor's latest snapshot (``GET /metrics``).

The swarm gauges are produced from the snapshot at every scrape of /metrics by a custom collector, so a peer or
model that has gone leaves no stale series behind. Label values are the validated DHT prefix, block index and
base58 peer ID (derived from the peer's key); no free text a peer announces (such as its public name) is exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swarm.monitor.state import PEER_STATES, Snapshot, is_healthy

NAMESPACE = "blockswarm"
SCRAPE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SwarmCollector(Collector):
    def __init__(self, latest: Callable[[], Snapshot | None]):
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        snapshot = self.latest()
        if snapshot is None:
            return
        m = {
            "blocks": GaugeMetricFamily(f"{NAMESPACE}_model_blocks", "Blocks of the model", labels=["model"]),
            "covered": GaugeMetricFamily(
                f"{NAMESPACE}_model_blocks_covered", "Blocks served by at least one online peer", labels=["model"]
            ),
            "healthy": GaugeMetricFamily(
                f"{NAMESPACE}_model_healthy", "1 if every block of the model is served, else 0", labels=["model"]
            ),
            "online": GaugeMetricFamily(
                f"{NAMESPACE}_peers_online", "Peers announced online that answer the monitor", labels=["model"]
            ),
            "peers": GaugeMetricFamily(
                f"{NAMESPACE}_peers", "Listed peers by state, as the monitor sees them", labels=["model", "state"]
            ),
            "redundancy": GaugeMetricFamily(
                f"{NAMESPACE}_block_redundancy", "Online peers serving the block", labels=["model", "block"]
            ),
            "throughput": GaugeMetricFamily(
                f"{NAMESPACE}_peer_throughput_tokens_per_second",
                "Throughput the peer announced for its whole span",
                labels=["model", "peer_id"],
            ),
            "cache": GaugeMetricFamily(
                f"{NAMESPACE}_peer_cache_tokens_left",
                "KV-cache tokens the peer announced as free",
                labels=["model", "peer_id"],
            ),
            "rtt": GaugeMetricFamily(
                f"{NAMESPACE}_peer_rtt_seconds",
                "Round trip of an info call from the monitor",
                labels=["model", "peer_id"],
            ),
            "batch": GaugeMetricFamily(
                f"{NAMESPACE}_peer_batch_sessions",
                "Sessions in the peer's last batched step, as it told the monitor's probe",
                labels=["model", "peer_id"],
            ),
            "queue": GaugeMetricFamily(
                f"{NAMESPACE}_peer_queue_length",
                "Computations waiting in the peer's scheduler, as it told the monitor's probe",
                labels=["model", "peer_id"],
            ),
        }
        for model in snapshot.models:
            prefix = model.info.prefix
            covered = sum(1 for c in model.coverage if c > 0)
            if model.info.num_blocks is not None:
                m["blocks"].add_metric([prefix], model.info.num_blocks)
            m["covered"].add_metric([prefix], covered)
            m["healthy"].add_metric([prefix], 1.0 if is_healthy(model.coverage) else 0.0)
            m["online"].add_metric([prefix], sum(1 for p in model.peers if p.state == "online"))
            for state in PEER_STATES:
                m["peers"].add_metric([prefix, state], sum(1 for p in model.peers if p.state == state))
            for block, count in enumerate(model.coverage):
                m["redundancy"].add_metric([prefix, str(block)], count)
            for peer in model.peers:
                m["throughput"].add_metric([prefix, peer.peer_id], peer.record.throughput)
                m["cache"].add_metric([prefix, peer.peer_id], peer.record.cache_tokens_left)
                probe = peer.probe
                if probe is not None and probe.rtt_s is not None:
                    m["rtt"].add_metric([prefix, peer.peer_id], probe.rtt_s)
                if probe is not None and probe.batch_sessions is not None:
                    m["batch"].add_metric([prefix, peer.peer_id], probe.batch_sessions)
                if probe is not None and probe.queue_length is not None:
                    m["queue"].add_metric([prefix, peer.peer_id], probe.queue_length)
        yield from m.values()


class MonitorMetrics:
    """The registry behind /metrics: swarm gauges from the snapshot, plus the monitor's own scrape statistics."""

    def __init__(self, latest: Callable[[], Snapshot | None]):
        self.registry = CollectorRegistry()
        self.registry.register(SwarmCollector(latest))
        self.scrape_duration = Histogram(
            f"{NAMESPACE}_monitor_scrape_duration_seconds",
            "Time the monitor took to look at the whole swarm (DHT lookups and peer probes)",
            buckets=SCRAPE_BUCKETS,
            registry=self.registry,
        )
        self.scrapes = Counter(
            f"{NAMESPACE}_monitor_scrapes", "Looks at the swarm, by result", ["result"], registry=self.registry
        )
        self.last_scrape = Gauge(
            f"{NAMESPACE}_monitor_last_scrape_timestamp_seconds",
            "When the last look at the swarm started (UTC epoch seconds)",
            registry=self.registry,
        )

    def observe_scrape(self, started_at: float, duration_s: float, ok: bool) -> None:
        self.scrape_duration.observe(duration_s)
        self.scrapes.labels("ok" if ok else "error").inc()
        self.last_scrape.set(started_at)

    def render(self) -> bytes:
        return generate_latest(self.registry)
