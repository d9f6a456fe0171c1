"""Route search over a snapshot of the swarm: pure functions, no network.

A route is a chain of (peer, [start, end)) spans that covers the requested blocks in order. Inference uses the
least expected time per token (measured round trips + announced compute speed); whole-sequence work spreads
over replicas by throughput; `fewest_hops_route` is the plain hop-count search and names uncovered blocks.
"""

from __future__ import annotations

import dataclasses
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
    dtype: str = "float32"  # compute dtype and weight quantization: spot checks compare only like with like
    quant: str = "none"
    # size limits of one request, where announced: the client cuts its batches to them (swarm.limits)
    max_batch: int | None = None
    max_forward_tokens: int | None = None
    max_backward_tokens: int | None = None


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
                peer_id,
                a.start,
                a.end,
                a.record.throughput,
                a.record.cache_tokens_left,
                a.record.max_length,
                a.record.dtype,
                a.record.quant,
                a.record.max_batch,
                a.record.max_forward_tokens,
                a.record.max_backward_tokens,
            )
            for peer_id, a in peer_announcements(servers).items()
            if a.state == "online"
        }
        return cls(num_blocks, peers)

    def with_throughputs(self, throughputs: Mapping[PeerID, float]) -> SwarmSnapshot:
        """The same swarm with the throughputs a route search may count on (see `routing_throughputs`) in place of
        the announced ones; peers missing from `throughputs` keep theirs."""
        peers = {
            peer_id: dataclasses.replace(p, throughput=throughputs[peer_id]) if peer_id in throughputs else p
            for peer_id, p in self.peers.items()
        }
        return SwarmSnapshot(self.num_blocks, peers)

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
    penalty: Mapping[PeerID, float] | None = None,
) -> list[RouteSpan]:
    """The route with the least expected time per generated token (shortest path over block positions).

    A hop through peer p over blocks [a, b) costs p's round-trip time as this client measured it (`default_rtt`
    until measured) plus its compute time for those blocks, estimated from its announced throughput (tokens/s over
    its whole span); a peer whose announced free cache is below `tokens_needed` costs `full_cache_penalty` more,
    and each peer `penalty[peer]` more (spot checks: peers without a record of passed checks cost a little more).
    """
    penalty = penalty or {}
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
            extra = full_cache_penalty if p.cache_tokens_left < tokens_needed else 0.0
            extra += penalty.get(p.peer_id, 0.0)
            new_cost = cost + rtt.get(p.peer_id, default_rtt) + compute + extra
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


# ---- claims count only after they are observed ----


def observed_block_rate(blocks: int, seconds: float) -> float:
    """Blocks per second one call showed: `blocks` of a peer's blocks ran for one request in `seconds` of the
    client's wall time (network included). Any request costs at least one single-token step, so this is a lower
    bound of the peer's decode speed; divided by the peer's span length it is in the unit of the announced
    throughput (tokens/s through the whole span)."""
    return blocks / max(seconds, 1e-9)


def effective_throughput(
    claimed: float, measured: float | None, reached: bool, default: float, max_claim_ratio: float
) -> float:
    """The throughput a route search counts on for one peer, given what it announced and what the client saw.

    - A peer never reached, or reached but never measured: ``min(claimed, default)``. Its claim is only a claim;
      `default` is conservative (see `routing_throughputs`), so an unobserved peer never outranks observed ones.
    - A measured peer: ``min(claimed, max_claim_ratio * measured)``. The measurement is a lower bound (it includes
      the network), so an honest claim is usually a small multiple of it; a claim more than `max_claim_ratio`
      times what the client observed is capped there.
    """
    if not reached or measured is None:
        return min(claimed, default)
    return min(claimed, max_claim_ratio * measured)


def measured_throughputs(snapshot: SwarmSnapshot, block_rates: Mapping[PeerID, float]) -> dict[PeerID, float]:
    """Best observed block rate of each peer of the snapshot, as tokens/s through its current span."""
    return {
        peer_id: block_rates[peer_id] / (p.end - p.start)
        for peer_id, p in snapshot.peers.items()
        if peer_id in block_rates
    }


def routing_throughputs(
    snapshot: SwarmSnapshot,
    block_rates: Mapping[PeerID, float],
    reached: Collection[PeerID],
    fallback: float,
    max_claim_ratio: float,
) -> dict[PeerID, float]:
    """`effective_throughput` of every peer of the snapshot. The default for unmeasured peers is the lowest
    effective throughput among the measured ones (an unobserved peer is assumed no better than the worst peer
    observed), or `fallback` while none is measured."""
    measured = measured_throughputs(snapshot, block_rates)
    observed = [
        effective_throughput(p.throughput, measured[peer_id], True, math.inf, max_claim_ratio)
        for peer_id, p in snapshot.peers.items()
        if peer_id in measured and peer_id in reached
    ]
    default = min(observed) if observed else fallback
    return {
        peer_id: effective_throughput(p.throughput, measured.get(peer_id), peer_id in reached, default, max_claim_ratio)
        for peer_id, p in snapshot.peers.items()
    }


def capped_claims(
    snapshot: SwarmSnapshot, block_rates: Mapping[PeerID, float], max_claim_ratio: float
) -> dict[PeerID, tuple[float, float]]:
    """Peers whose announced throughput exceeds `max_claim_ratio` times what the client measured:
    peer -> (claimed, measured), both in tokens/s through the peer's span."""
    measured = measured_throughputs(snapshot, block_rates)
    return {
        peer_id: (snapshot.peers[peer_id].throughput, rate)
        for peer_id, rate in measured.items()
        if snapshot.peers[peer_id].throughput > max_claim_ratio * rate
    }
