"""Choosing which blocks a peer serves, and when it should move (pure functions over the swarm's coverage).

Coverage of a block is the summed announced throughput of the peers serving it (or a plain count, with weight 1
each); the swarm is as fast as its weakest block, so a peer goes where it raises the weakest blocks most.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only types: these pure functions need no DHT
    from hivemind.p2p import PeerID

    from dht.records import PeerAnnouncement


def coverage(num_blocks: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """How many servers cover each block, given their spans [start, end)."""
    counts = [0] * num_blocks
    for start, end in spans:
        for block in range(max(0, start), min(end, num_blocks)):
            counts[block] += 1
    return counts


def throughput_coverage(num_blocks: int, spans: Sequence[tuple[int, int, float]]) -> list[float]:
    """Summed throughput of the servers of each block, given (start, end, throughput) per server."""
    totals = [0.0] * num_blocks
    for start, end, throughput in spans:
        for block in range(max(0, start), min(end, num_blocks)):
            totals[block] += throughput
    return totals


def effective_throughputs(throughputs: Sequence[float], default: float = 1.0) -> list[float]:
    """Peers still joining announce 0 (not measured yet): count them as a typical peer, not as no peer, so that
    peers starting together do not all pile onto the same blocks."""
    known = [t for t in throughputs if t > 0]
    typical = statistics.median(known) if known else default
    return [t if t > 0 else typical for t in throughputs]


def spans_of_others(announcements: Mapping[PeerID, PeerAnnouncement], me: PeerID) -> list[tuple[int, int, float]]:
    """(start, end, throughput) of every peer but `me` that is not announced offline (joining ones count: they are
    coming), each over the contiguous run of blocks it announces (dht.records.peer_announcements), peers not
    measured yet counted as typical ones (effective_throughputs)."""
    others = [a for peer_id, a in announcements.items() if peer_id != me and a.state != "offline"]
    throughputs = effective_throughputs([a.record.throughput for a in others])
    return [(a.start, a.end, t) for a, t in zip(others, throughputs, strict=True)]


def _with_span(cov: Sequence[float], start: int, end: int, weight: float) -> list[float]:
    return [c + weight if start <= i < end else c for i, c in enumerate(cov)]


def choose_span(num_blocks: int, span_length: int, cov: Sequence[float], own: float = 1.0) -> tuple[int, int]:
    """The window of `span_length` blocks that leaves the swarm's coverage best once this peer (weight `own`)
    serves it: the sorted coverage after adding it is compared lexicographically (the weakest block first, then
    the next...), earliest window on ties. So a window with uncovered blocks beats any window without."""
    if span_length < 1:
        raise ValueError(f"span length must be >= 1, got {span_length}")
    if own <= 0:
        raise ValueError(f"own throughput must be > 0, got {own}")
    span_length = min(span_length, num_blocks)
    best_start = max(
        range(num_blocks - span_length + 1),
        key=lambda s: (sorted(_with_span(cov, s, s + span_length, own)), -s),
    )
    return best_start, best_start + span_length


def _quality(cov: Sequence[float]) -> tuple[int, float]:
    """Higher is better: fewer uncovered blocks first, then a stronger weakest block."""
    return (-sum(1 for c in cov if c <= 0), min(cov, default=0.0))


def plan_move(
    num_blocks: int,
    current: tuple[int, int],
    others: Sequence[tuple[int, int, float]],
    own: float,
    balance_quality: float = 0.75,
) -> tuple[int, int] | None:
    """Where this peer (serving `current`, throughput `own`) should move, or None to stay.

    `others` are the other peers' (start, end, throughput). A peer never moves while it is the only server of any
    of its blocks, so moving never uncovers a block. It moves when that leaves fewer blocks uncovered, or, with
    everything covered, when the weakest block's coverage now is below `balance_quality` times what it would be
    after the move (so small gains do not make peers shuffle back and forth).
    """
    if not 0 < balance_quality <= 1:
        raise ValueError(f"balance_quality must be in (0, 1], got {balance_quality}")
    start, end = current
    without_me = throughput_coverage(num_blocks, others)
    if any(without_me[b] <= 0 for b in range(start, min(end, num_blocks))):
        return None
    target = choose_span(num_blocks, end - start, without_me, own)
    if target == (start, end):
        return None
    now = _quality(_with_span(without_me, start, end, own))
    after = _quality(_with_span(without_me, *target, own))
    if after[0] > now[0]:
        return target
    if after[0] == now[0] == 0 and now[1] < balance_quality * after[1]:
        return target
    return None
