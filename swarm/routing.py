"""Route search over a snapshot of the swarm: pure functions, no network.

A route is a chain of (peer, [start, end)) spans that covers the requested blocks in order. Inference uses the
least expected time per token (measured round trips + announced compute speed); whole-sequence work spreads
over replicas by throughput; `fewest_hops_route` is the plain hop-count search and names uncovered blocks.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from hivemind.p2p import PeerID

from dht.records import BlockServer, peer_announcements


class NoRouteError(RuntimeError):
    """Some blocks have no usable server."""

    def __init__(self, uncovered: list[int], prefix: str = "", min_length: int | None = None):
        self.uncovered, self.prefix, self.min_length = uncovered, prefix, min_length
        where = f" of {prefix}" if prefix else ""
        why = f" with max_length >= {min_length} (some serve them with a shorter limit)" if min_length else ""
        super().__init__(f"no online peer serves block(s) {_ranges(uncovered)}{where}{why}")


@dataclass(frozen=True)
class RouteSpan:
    peer_id: PeerID
    start: int
    end: int

    @property
    def uid(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True)
class PeerSpan:
    """What one peer serves, merged from its per-block records."""

    peer_id: PeerID
    start: int
    end: int
    throughput: float
    cache_tokens_left: int
    max_length: int


@dataclass
class SwarmSnapshot:
    num_blocks: int
    peers: dict[PeerID, PeerSpan] = field(default_factory=dict)

    @classmethod
    def from_servers(cls, num_blocks: int, servers: dict[int, list[BlockServer]]) -> SwarmSnapshot:
        """Peers whose announcement is online, each over the contiguous run of blocks it announces
        (dht.records.peer_announcements: a peer's freshest record stands for it; leftovers of an earlier span or
        state are ignored until they expire)."""
        peers = {
            peer_id: PeerSpan(
                peer_id, a.start, a.end, a.record.throughput, a.record.cache_tokens_left, a.record.max_length
            )
            for peer_id, a in peer_announcements(servers).items()
            if a.state == "online"
        }
        return cls(num_blocks, peers)

    def uncovered(self, start: int, end: int, exclude: Collection[PeerID] = (), min_length: int = 1) -> list[int]:
        """Blocks in [start, end) that no peer outside `exclude` with max_length >= min_length serves."""
        covered = set()
        for p in self.peers.values():
            if p.peer_id not in exclude and p.max_length >= min_length:
                covered.update(range(p.start, p.end))
        return [b for b in range(start, end) if b not in covered]


def _ranges(blocks: Iterable[int]) -> str:
    blocks = sorted(blocks)
    parts, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        parts.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ", ".join(parts)


def excluded_peers(
    snapshot: SwarmSnapshot,
    allowed: Collection[PeerID] | None = None,
    blocked: Collection[PeerID] = (),
    banned: Collection[PeerID] = (),
) -> set[PeerID]:
    """Peers a route must avoid: blocked or banned ones, and with an allow-list, everyone not on it."""
    excluded = set(blocked) | set(banned)
    if allowed is not None:
        allowed = set(allowed)
        excluded |= {peer for peer in snapshot.peers if peer not in allowed}
    return excluded


def fewest_hops_route(
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    *,
    exclude: Collection[PeerID] = (),
    min_length: int = 1,
) -> list[RouteSpan]:
    """Cover blocks [start, end) with as few peers as possible.

    Greedy by farthest reach is optimal for hop count on intervals; ties go to the higher announced throughput.
    Peers in `exclude`, and peers whose max_length is below `min_length`, are skipped.
    """
    usable = [p for p in snapshot.peers.values() if p.peer_id not in exclude and p.max_length >= min_length]
    route, position = [], start
    while position < end:
        candidates = [p for p in usable if p.start <= position < p.end]
        if not candidates:
            uncovered = snapshot.uncovered(start, end, exclude, min_length) or [position]
            too_short = not set(uncovered).issubset(snapshot.uncovered(start, end, exclude))
            raise NoRouteError(uncovered, min_length=min_length if too_short else None)
        best = max(candidates, key=lambda p: (min(p.end, end), p.throughput, p.peer_id.to_bytes()))
        route.append(RouteSpan(best.peer_id, position, min(best.end, end)))
        position = min(best.end, end)
    return route


def min_latency_route(
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    *,
    rtt: Mapping[PeerID, float],
    default_rtt: float,
    exclude: Collection[PeerID] = (),
    min_length: int = 1,
    tokens_needed: int = 0,
    full_cache_penalty: float = 1.0,
) -> list[RouteSpan]:
    """The route with the least expected time per generated token (shortest path over block positions).

    A hop through peer p over blocks [a, b) costs p's round-trip time as this client measured it (`default_rtt`
    until measured) plus its compute time for those blocks, estimated from its announced throughput (tokens/s over
    its whole span); a peer whose announced free cache is below `tokens_needed` costs `full_cache_penalty` more.
    """
    usable = [p for p in snapshot.peers.values() if p.peer_id not in exclude and p.max_length >= min_length]
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, RouteSpan] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, position = heapq.heappop(queue)
        if position == end:
            break
        if cost > best.get(position, math.inf):
            continue
        for p in usable:
            if not p.start <= position < p.end:
                continue
            reach = min(p.end, end)
            compute = (reach - position) / (max(p.throughput, 1e-6) * (p.end - p.start))
            penalty = full_cache_penalty if p.cache_tokens_left < tokens_needed else 0.0
            new_cost = cost + rtt.get(p.peer_id, default_rtt) + compute + penalty
            if new_cost < best.get(reach, math.inf):
                best[reach] = new_cost
                came_from[reach] = RouteSpan(p.peer_id, position, reach)
                heapq.heappush(queue, (new_cost, reach))
    if end not in came_from and start != end:
        # Same diagnosis as the hop-count search: which blocks nobody usable serves.
        return fewest_hops_route(snapshot, start, end, exclude=exclude, min_length=min_length)
    route, position = [], end
    while position != start:
        span = came_from[position]
        route.append(span)
        position = span.start
    return route[::-1]


def throughput_weighted_route(
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    *,
    rng: random.Random,
    exclude: Collection[PeerID] = (),
    min_length: int = 1,
) -> list[RouteSpan]:
    """For whole-sequence work: at each position pick one of the peers serving it, with probability proportional
    to its announced throughput, so that many such requests spread over the replicas by their capacity."""
    usable = [p for p in snapshot.peers.values() if p.peer_id not in exclude and p.max_length >= min_length]
    route, position = [], start
    while position < end:
        candidates = [p for p in usable if p.start <= position < p.end]
        if not candidates:
            raise NoRouteError(snapshot.uncovered(start, end, exclude, min_length) or [position])
        [chosen] = rng.choices(candidates, weights=[max(p.throughput, 1e-6) for p in candidates])
        route.append(RouteSpan(chosen.peer_id, position, min(chosen.end, end)))
        position = min(chosen.end, end)
    return route
