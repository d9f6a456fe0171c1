"""What the monitor knows about the swarm at one moment, and the pure functions that derive it.

Nothing here touches the network: the collector feeds in validated DHT entries and probe results, the store feeds
in history samples, and these functions compute states, coverage, health, uptime and the JSON document
(``GET /api/v1/state``, described by ``state.schema.json``). All times are UTC epoch seconds.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dht.models import ModelEntry
from dht.records import BlockServer, ServerRecord, peer_announcements

SCHEMA_VERSION = 1
PeerState = Literal["joining", "online", "offline", "unreachable"]
PEER_STATES: tuple[PeerState, ...] = ("joining", "online", "offline", "unreachable")
Connection = Literal["direct", "relayed"]
SHORT_ID_CHARS = 8  # the tail of a base58 peer ID: the head is the same multihash prefix for every RSA key


def short_id(peer_id: str) -> str:
    return "…" + peer_id[-SHORT_ID_CHARS:]


@dataclass(frozen=True)
class ModelInfo:
    """A model the monitor watches; num_blocks is None while nobody has announced it (e.g. from --models only)."""

    prefix: str
    num_blocks: int | None
    family: str | None = None
    name: str | None = None
    registered_by: int = 0  # peers whose registry entry currently names this model


@dataclass(frozen=True)
class Probe:
    """The monitor's own measurement of one peer: an info call's round trip, or why it failed, and the batching
    state the peer told in its last answer (None when the probe failed, or the peer sent a value that is not a
    count)."""

    rtt_s: float | None
    connection: Connection | None
    error: str | None = None
    batch_sessions: int | None = None  # sessions in the peer's last batched step
    queue_length: int | None = None  # computations waiting in the peer's scheduler


def reported_count(value: object) -> int | None:
    """A count a peer reported about itself, if it is one (a non-negative int, not a bool); else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class PeerView:
    peer_id: str
    record: ServerRecord  # the freshest of the peer's block records (they are one announcement)
    blocks: tuple[int, ...]  # blocks under which the freshest record's state and span were found
    expires_at: float
    state: PeerState
    probe: Probe | None  # None: not probed (only peers announced online are)


@dataclass(frozen=True)
class ModelView:
    info: ModelInfo
    peers: list[PeerView]
    coverage: list[int]  # peers online per block
    hidden_peers: int = 0  # peers beyond --max-peers: neither listed nor probed, so not counted in coverage


@dataclass(frozen=True)
class ModelSample:
    t: float
    covered: int
    num_blocks: int | None
    healthy: bool


@dataclass(frozen=True)
class PeerSample:
    t: float
    peer_id: str
    state: PeerState
    public_name: str | None


@dataclass(frozen=True)
class CoverageBucket:
    t: float
    min_covered: int | None
    healthy_fraction: float | None


@dataclass(frozen=True)
class PeerHistory:
    peer_id: str
    public_name: str | None
    first_seen: float
    last_seen: float
    uptime: float  # fraction of the monitor's looks at the model in the window that found this peer online
    timeline: list[float | None]  # the same fraction per bucket; None where the monitor did not look


@dataclass(frozen=True)
class History:
    start: float
    end: float
    bucket_s: float
    coverage: list[CoverageBucket]
    peers: list[PeerHistory]


@dataclass(frozen=True)
class ScrapeInfo:
    started_at: float
    duration_s: float
    error: str | None = None


@dataclass
class Snapshot:
    generated_at: float
    scrape: ScrapeInfo
    models: list[ModelView]
    histories: dict[str, History] = field(default_factory=dict)


# ---- models ----


def resolve_models(
    entries: Iterable[ModelEntry],
    wanted: Sequence[str],
    known: dict[str, ModelInfo],
    max_models: int,
    max_blocks: int,
) -> list[ModelInfo]:
    """The models to watch: the registry's (or only `wanted` ones), plus ones seen before that are gone now.

    Peers may disagree about a model's size (a bug or a lie): the size announced by most peers wins, and on a tie
    the larger, so that a short claim can never hide uncovered blocks. Models announced with more than
    `max_blocks` blocks are skipped; at most `max_models` are kept, the most registered first.
    """
    by_prefix: dict[str, list[ModelEntry]] = defaultdict(list)
    for entry in entries:
        if entry.record.num_blocks <= max_blocks:
            by_prefix[entry.record.prefix].append(entry)
    models: dict[str, ModelInfo] = {}
    for prefix, group in by_prefix.items():
        sizes = Counter(e.record.num_blocks for e in group)
        num_blocks = max(sizes, key=lambda n: (sizes[n], n))
        pick = next(e.record for e in group if e.record.num_blocks == num_blocks)
        models[prefix] = ModelInfo(prefix, num_blocks, pick.family, pick.name, len(group))
    for prefix, info in known.items():
        if prefix not in models:
            models[prefix] = ModelInfo(prefix, info.num_blocks, info.family, info.name, 0)
    if wanted:
        models = {p: models.get(p, ModelInfo(p, None)) for p in wanted}
    ranked = sorted(models.values(), key=lambda m: (-m.registered_by, m.prefix))[:max_models]
    return sorted(ranked, key=lambda m: m.prefix)


# ---- peers ----


@dataclass(frozen=True)
class AnnouncedPeer:
    peer_id: str
    record: ServerRecord
    blocks: tuple[int, ...]
    expires_at: float


def group_by_peer(servers: dict[int, list[BlockServer]]) -> list[AnnouncedPeer]:
    """Block -> servers, regrouped per peer in peer ID order, every announced state kept (the monitor shows them
    all); the rule of what a peer announces is dht.records.peer_announcements'."""
    announced = [
        AnnouncedPeer(peer_id.to_base58(), a.record, a.blocks, a.expiration)
        for peer_id, a in peer_announcements(servers).items()
    ]
    return sorted(announced, key=lambda p: p.peer_id)


def effective_state(announced: str, probe: Probe | None) -> PeerState:
    """A peer announced online that does not answer the monitor is unreachable; other states are as announced."""
    if announced == "online" and probe is not None and probe.rtt_s is None:
        return "unreachable"
    if announced not in PEER_STATES:
        raise ValueError(f"unknown announced state {announced!r}")
    return announced  # type: ignore[return-value]  # checked just above


def connection_kind(addrs: Iterable[str]) -> Connection | None:
    """'relayed' if every address of the open connection goes through a relay (/p2p-circuit), else 'direct'."""
    addrs = list(addrs)
    if not addrs:
        return None
    return "relayed" if all("/p2p-circuit" in a for a in addrs) else "direct"


def block_coverage(num_blocks: int, peers: Iterable[PeerView]) -> list[int]:
    """Peers online per block, counting only blocks under which a peer's record was actually found, and only peers
    that answered the monitor's probe: an announcement counts once it is observed (a record of a peer that does not
    run is unreachable; one the monitor did not probe is unknown)."""
    counts = [0] * num_blocks
    for peer in peers:
        if peer.state == "online" and peer.probe is not None and peer.probe.rtt_s is not None:
            for block in peer.blocks:
                if 0 <= block < num_blocks:
                    counts[block] += 1
    return counts


def gaps(coverage: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of blocks that no peer serves."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, count in enumerate([*coverage, 1]):
        if count == 0 and start is None:
            start = i
        elif count > 0 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def is_healthy(coverage: Sequence[int]) -> bool:
    """Healthy: the model's size is known and every block is served by at least one online peer."""
    return bool(coverage) and min(coverage) > 0


# ---- history ----


def bucket_of(t: float, start: float, end: float, buckets: int) -> int | None:
    """Index of the bucket of [start, end] (split into `buckets` equal parts) that holds `t`; the end is inclusive."""
    if not start <= t <= end or end <= start:
        return None
    return min(int((t - start) / (end - start) * buckets), buckets - 1)


def coverage_timeline(samples: Sequence[ModelSample], start: float, end: float, buckets: int) -> list[CoverageBucket]:
    width = (end - start) / buckets
    covered: list[list[int]] = [[] for _ in range(buckets)]
    healthy: list[list[bool]] = [[] for _ in range(buckets)]
    for s in samples:
        i = bucket_of(s.t, start, end, buckets)
        if i is not None:
            covered[i].append(s.covered)
            healthy[i].append(s.healthy)
    return [
        CoverageBucket(
            start + i * width,
            min(covered[i]) if covered[i] else None,
            sum(healthy[i]) / len(healthy[i]) if healthy[i] else None,
        )
        for i in range(buckets)
    ]


def peer_histories(
    scrape_times: Sequence[float], samples: Sequence[PeerSample], start: float, end: float, buckets: int
) -> list[PeerHistory]:
    """Uptime of every peer seen in [start, end]: the share of the monitor's looks at the model that found it online.

    The denominator is the monitor's looks, not wall time: while the monitor itself was down nothing is known, and
    that counts neither for nor against a peer. A peer that joined late is down for the looks before it joined.
    """
    looks = [t for t in scrape_times if start <= t <= end]
    looks_per_bucket = [0] * buckets
    for t in looks:
        i = bucket_of(t, start, end, buckets)
        if i is not None:
            looks_per_bucket[i] += 1
    seen: dict[str, list[PeerSample]] = defaultdict(list)
    for s in samples:
        if start <= s.t <= end:
            seen[s.peer_id].append(s)
    histories = []
    for peer_id, own in seen.items():
        own.sort(key=lambda s: s.t)
        online_times = {s.t for s in own if s.state == "online"}
        online_per_bucket = [0] * buckets
        for t in online_times:
            i = bucket_of(t, start, end, buckets)
            if i is not None:
                online_per_bucket[i] += 1
        names = [s.public_name for s in own if s.public_name is not None]
        histories.append(
            PeerHistory(
                peer_id=peer_id,
                public_name=names[-1] if names else None,
                first_seen=own[0].t,
                last_seen=own[-1].t,
                uptime=len(online_times) / len(looks) if looks else 0.0,
                timeline=[
                    min(1.0, online_per_bucket[i] / looks_per_bucket[i]) if looks_per_bucket[i] else None
                    for i in range(buckets)
                ],
            )
        )
    return sorted(histories, key=lambda h: (-h.uptime, h.peer_id))


# ---- JSON ----


def _peer_json(peer: PeerView) -> dict[str, Any]:
    r = peer.record
    return {
        "peer_id": peer.peer_id,
        "short_id": short_id(peer.peer_id),
        "public_name": r.public_name,
        "version": r.version,
        "state": peer.state,
        "announced_state": r.state,
        "start": r.start,
        "end": r.end,
        "blocks": list(peer.blocks),
        "dtype": r.dtype,
        "quant": r.quant,
        "throughput": r.throughput if math.isfinite(r.throughput) else None,  # the schema admits +inf; JSON cannot
        "cache_tokens_left": r.cache_tokens_left,
        "max_length": r.max_length,
        "connection": peer.probe.connection if peer.probe else None,
        "rtt_s": peer.probe.rtt_s if peer.probe else None,
        "probe_error": peer.probe.error if peer.probe else None,
        "batch_sessions": peer.probe.batch_sessions if peer.probe else None,
        "queue_length": peer.probe.queue_length if peer.probe else None,
        "expires_at": peer.expires_at,
    }


def _history_json(history: History | None) -> dict[str, Any] | None:
    if history is None:
        return None
    return {
        "start": history.start,
        "end": history.end,
        "bucket_s": history.bucket_s,
        "coverage": [
            {"t": b.t, "min_covered": b.min_covered, "healthy_fraction": b.healthy_fraction} for b in history.coverage
        ],
        "peers": [
            {
                "peer_id": h.peer_id,
                "short_id": short_id(h.peer_id),
                "public_name": h.public_name,
                "first_seen": h.first_seen,
                "last_seen": h.last_seen,
                "uptime": h.uptime,
                "timeline": h.timeline,
            }
            for h in history.peers
        ],
    }


def model_json(model: ModelView, history: History | None) -> dict[str, Any]:
    states = Counter(p.state for p in model.peers)
    return {
        "prefix": model.info.prefix,
        "name": model.info.name,
        "family": model.info.family,
        "num_blocks": model.info.num_blocks,
        "registered_by": model.info.registered_by,
        "healthy": is_healthy(model.coverage),
        "blocks_covered": sum(1 for c in model.coverage if c > 0),
        "coverage": list(model.coverage),
        "gaps": [list(g) for g in gaps(model.coverage)],
        "peer_counts": {state: states.get(state, 0) for state in PEER_STATES},
        "hidden_peers": model.hidden_peers,
        "peers": [_peer_json(p) for p in model.peers],
        "history": _history_json(history),
    }


def state_json(snapshot: Snapshot, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": snapshot.generated_at,
        "settings": settings,
        "scrape": {
            "started_at": snapshot.scrape.started_at,
            "duration_s": snapshot.scrape.duration_s,
            "error": snapshot.scrape.error,
        },
        "models": [model_json(m, snapshot.histories.get(m.info.prefix)) for m in snapshot.models],
    }
