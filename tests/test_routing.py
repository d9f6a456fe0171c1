"""swarm.routing and peers.placement: pure functions over hand-built swarm snapshots."""

from __future__ import annotations

import math
import random

import pytest
from hivemind.p2p import PeerID
from test_records import block_servers, make_record

from dht.records import ServerRecord, peer_announcements
from peers.placement import (
    choose_span,
    coverage,
    effective_throughputs,
    plan_move,
    spans_of_others,
    throughput_coverage,
)
from swarm.routing import (
    NoRouteError,
    PeerSpan,
    RouteSpan,
    SwarmSnapshot,
    excluded_peers,
    fewest_hops_route,
    min_latency_route,
    throughput_weighted_route,
)

# Real libp2p peer IDs (made with dht.identity.load_or_create_identity(None)).
IDS = [
    PeerID.from_base58(text)
    for text in (
        "QmZ51uiRq4szsNu12oVr8t7RUbA97dz6uXCVghMppUALN8",
        "QmUqTvzgtAd4ptVHmaoVsj3tuzXCy8CRoWmGpQuAECrtPA",
        "QmUQJatcuUJ692Euos1DoBbM9cmNUxJy612w8fSjdMxEoy",
        "QmYm7k4QFdrdD7dAVqvvimpXE2xzSiDxNiyN9rKEj97uqx",
        "Qme7PSWX6K5jt1eM1DxBckCMZb9BL5hJb8a16AUmMaxxKz",
        "QmawQPQRVf6pjDG6ZR5JFyfLTSNZJn16YxohnB5pum215Q",
        "QmbxokQ7YpU1wrgwRouGjSqte4LWfE7avxmDPuhCdKmu8r",
        "QmUry5zLoKNrKEN8KG8PxkkwjsNjTt9CgtmSfVP2PTtnSv",
    )
]
A, B, C, D, E, F, G, H = IDS


def snapshot(num_blocks: int, *spans: tuple) -> SwarmSnapshot:
    """spans: (peer_id, start, end[, throughput[, max_length]])."""
    peers = {}
    for peer_id, start, end, *rest in spans:
        throughput = rest[0] if rest else 1.0
        max_length = rest[1] if len(rest) > 1 else 2048
        peers[peer_id] = PeerSpan(peer_id, start, end, throughput, 1000, max_length)
    return SwarmSnapshot(num_blocks, peers)


def min_hops(snap: SwarmSnapshot, start: int, end: int, exclude=(), min_length: int = 1) -> int | None:
    """Fewest hops by breadth-first search over positions (an independent reference)."""
    usable = [p for p in snap.peers.values() if p.peer_id not in exclude and p.max_length >= min_length]
    frontier, seen, hops = {start}, {start}, 0
    while frontier:
        if end in frontier or any(pos >= end for pos in frontier):
            return hops
        nxt = set()
        for pos in frontier:
            for p in usable:
                if p.start <= pos < p.end:
                    reach = min(p.end, end)
                    if reach not in seen:
                        seen.add(reach)
                        nxt.add(reach)
        frontier, hops = nxt, hops + 1
    return None


def check_route(snap: SwarmSnapshot, route: list[RouteSpan], start: int, end: int) -> None:
    assert route, "empty route"
    assert route[0].start == start and route[-1].end == end
    for prev, nxt in zip(route[:-1], route[1:], strict=True):
        assert prev.end == nxt.start  # contiguous, in order, no overlap
    for hop in route:
        peer = snap.peers[hop.peer_id]
        assert peer.start <= hop.start < hop.end <= peer.end  # each hop is inside what its peer serves
        assert hop.uid == f"{hop.start}:{hop.end}"


# ---- fewest_hops_route ----


def test_covers_with_fewest_hops():
    snap = snapshot(8, (A, 0, 3, 10.0), (B, 3, 8, 10.0), (C, 0, 5, 1.0), (D, 5, 8, 1.0), (E, 0, 1), (F, 1, 8))
    route = fewest_hops_route(snap, 0, 8)
    check_route(snap, route, 0, 8)
    assert len(route) == 2 == min_hops(snap, 0, 8)


def test_single_peer_serving_everything_is_one_hop():
    snap = snapshot(8, (A, 0, 4, 50.0), (B, 4, 8, 50.0), (C, 0, 8, 1.0))
    assert fewest_hops_route(snap, 0, 8) == [RouteSpan(C, 0, 8)]


def test_greedy_prefers_farther_reach_over_throughput():
    snap = snapshot(8, (A, 0, 4, 100.0), (B, 0, 6, 1.0), (C, 4, 8, 100.0), (D, 6, 8, 1.0))
    route = fewest_hops_route(snap, 0, 8)
    assert len(route) == 2
    assert route[0] == RouteSpan(B, 0, 6)


def test_prefers_higher_throughput_on_ties():
    snap = snapshot(6, (A, 0, 6, 5.0), (B, 0, 6, 9.0), (C, 0, 6, 7.0))
    assert fewest_hops_route(snap, 0, 6) == [RouteSpan(B, 0, 6)]
    # ties by reach *within the requested range*: both reach past block 3
    snap = snapshot(8, (A, 0, 4, 1.0), (B, 4, 8, 2.0), (C, 4, 6, 30.0), (D, 2, 8, 3.0))
    route = fewest_hops_route(snap, 0, 6)
    assert route == [RouteSpan(A, 0, 4), RouteSpan(C, 4, 6)]


def test_sub_range_route_is_clipped():
    snap = snapshot(10, (A, 0, 5), (B, 3, 10))
    route = fewest_hops_route(snap, 2, 7)
    assert route == [RouteSpan(A, 2, 5), RouteSpan(B, 5, 7)]
    assert fewest_hops_route(snap, 4, 5) in ([RouteSpan(A, 4, 5)], [RouteSpan(B, 4, 5)])


def test_exclude():
    snap = snapshot(8, (A, 0, 8, 10.0), (B, 0, 4, 1.0), (C, 4, 8, 1.0))
    assert fewest_hops_route(snap, 0, 8) == [RouteSpan(A, 0, 8)]
    assert fewest_hops_route(snap, 0, 8, exclude={A}) == [RouteSpan(B, 0, 4), RouteSpan(C, 4, 8)]
    with pytest.raises(NoRouteError) as info:
        fewest_hops_route(snap, 0, 8, exclude=[A, C])
    assert info.value.uncovered == [4, 5, 6, 7]
    assert "4-7" in str(info.value)
    assert "max_length" not in str(info.value)


def test_min_length():
    snap = snapshot(8, (A, 0, 8, 10.0, 128), (B, 0, 4, 1.0, 4096), (C, 4, 8, 1.0, 4096))
    assert fewest_hops_route(snap, 0, 8, min_length=128) == [RouteSpan(A, 0, 8)]
    assert fewest_hops_route(snap, 0, 8, min_length=129) == [RouteSpan(B, 0, 4), RouteSpan(C, 4, 8)]


def test_min_length_reports_the_blocks_it_leaves_uncovered():
    snap = snapshot(8, (A, 0, 4, 1.0, 4096), (B, 4, 8, 1.0, 64), (C, 6, 8, 1.0, 64))
    with pytest.raises(NoRouteError) as info:
        fewest_hops_route(snap, 0, 8, min_length=100)
    assert info.value.uncovered == [4, 5, 6, 7]
    assert "4-7" in str(info.value)
    assert "with max_length >= 100" in str(info.value), "the error must say the blocks are served, but too short"


def test_no_route_lists_exact_uncovered_blocks():
    snap = snapshot(10, (A, 0, 2), (B, 4, 5), (C, 8, 9))
    with pytest.raises(NoRouteError, match=r"serves block\(s\) 2-3, 5-7, 9$") as info:
        fewest_hops_route(snap, 0, 10)
    assert info.value.uncovered == [2, 3, 5, 6, 7, 9]
    message = str(info.value)
    assert "2-3" in message and "5-7" in message and "9" in message
    assert "block(s) 2-3, 5-7, 9" in message
    # only the requested range counts
    with pytest.raises(NoRouteError) as info:
        fewest_hops_route(snap, 1, 4)
    assert info.value.uncovered == [2, 3]


def test_no_route_on_empty_swarm():
    with pytest.raises(NoRouteError) as info:
        fewest_hops_route(SwarmSnapshot(4), 0, 4)
    assert info.value.uncovered == [0, 1, 2, 3]
    assert "0-3" in str(info.value)


def test_no_route_error_message_with_prefix():
    error = NoRouteError([1, 2, 3, 7], "tiny-llama")
    assert str(error) == "no online peer serves block(s) 1-3, 7 of tiny-llama"
    assert error.uncovered == [1, 2, 3, 7]


def test_random_snapshots_match_breadth_first_search():
    rng = random.Random(0)
    routed = failed = 0
    for _ in range(300):
        n = rng.randint(1, 12)
        spans = []
        for peer_id in rng.sample(IDS, rng.randint(0, len(IDS))):
            s = rng.randrange(n)
            spans.append((peer_id, s, rng.randint(s + 1, n), rng.choice([1.0, 2.0, 3.0]), rng.choice([64, 2048])))
        snap = snapshot(n, *spans)
        start = rng.randrange(n)
        end = rng.randint(start + 1, n)
        exclude = set(rng.sample(IDS, rng.randint(0, 2)))
        min_length = rng.choice([1, 100])
        best = min_hops(snap, start, end, exclude, min_length)
        if best is None:
            with pytest.raises(NoRouteError) as info:
                fewest_hops_route(snap, start, end, exclude=exclude, min_length=min_length)
            usable = [p for p in snap.peers.values() if p.peer_id not in exclude and p.max_length >= min_length]
            truly_uncovered = [b for b in range(start, end) if not any(p.start <= b < p.end for p in usable)]
            assert info.value.uncovered == truly_uncovered
            failed += 1
            continue
        route = fewest_hops_route(snap, start, end, exclude=exclude, min_length=min_length)
        check_route(snap, route, start, end)
        assert len(route) == best
        assert all(h.peer_id not in exclude and snap.peers[h.peer_id].max_length >= min_length for h in route)
        routed += 1
    assert routed > 50 and failed > 50  # both branches were exercised


# ---- SwarmSnapshot.from_servers ----


def _record(start: int, end: int, state: str = "online", throughput: float = 1.0, **kw) -> ServerRecord:
    values = dict(start=start, end=end, state=state, throughput=throughput, cache_tokens_left=500, max_length=256)
    return make_record(**{**values, **kw})


def test_from_servers_merges_and_filters():
    servers = block_servers(
        (A, [0, 1, 2], _record(0, 3, throughput=4.0, max_length=512, cache_tokens_left=77), 100.0),
        (B, [3, 4, 5], _record(3, 6, state="joining"), 100.0),
        (C, [0, 1, 2, 3, 4, 5, 6, 7], _record(0, 8, state="offline"), 100.0),
        (D, [4, 6, 7], _record(4, 8), 100.0),  # block 5's record lapsed: only the run from block 4 counts
    )
    snap = SwarmSnapshot.from_servers(8, servers)
    assert snap.num_blocks == 8
    assert set(snap.peers) == {A, D}
    assert snap.peers[A] == PeerSpan(A, 0, 3, 4.0, 77, 512)
    assert (snap.peers[D].start, snap.peers[D].end) == (4, 5)
    assert snap.uncovered(0, 8) == [3, 5, 6, 7]


def test_from_servers_uses_the_latest_record():
    servers = block_servers(
        (E, [2], _record(2, 4, throughput=1.0, cache_tokens_left=10), 100.0),
        (E, [3], _record(2, 4, throughput=7.0, cache_tokens_left=20), 200.0),
    )
    [peer] = SwarmSnapshot.from_servers(8, servers).peers.values()
    assert (peer.peer_id, peer.start, peer.end, peer.throughput, peer.cache_tokens_left) == (E, 2, 4, 7.0, 20)


def test_from_servers_mixed_states_of_one_peer():
    servers = block_servers(
        (F, [0], _record(0, 2), 100.0),
        (F, [1], _record(0, 2, state="offline"), 150.0),
    )
    # the newest record says the peer went offline: none of its older records count
    assert F not in SwarmSnapshot.from_servers(4, servers).peers


def test_from_servers_ignores_records_of_an_earlier_span():
    servers = block_servers(
        (F, [0, 1], _record(0, 2), 100.0),  # left over from before a restart
        (F, [2, 3], _record(2, 4), 150.0),
    )
    snap = SwarmSnapshot.from_servers(4, servers)
    assert (snap.peers[F].start, snap.peers[F].end) == (2, 4)
    assert snap.uncovered(0, 4) == [0, 1]


def test_from_servers_then_route():
    servers = block_servers(
        (A, [0, 1], _record(0, 2, throughput=5.0), 100.0),
        (B, [2, 3], _record(2, 4, throughput=5.0), 100.0),
        (C, [0, 1, 2, 3], _record(0, 4, state="joining", throughput=100.0), 100.0),
    )
    route = fewest_hops_route(SwarmSnapshot.from_servers(4, servers), 0, 4)
    assert route == [RouteSpan(A, 0, 2), RouteSpan(B, 2, 4)]
    assert SwarmSnapshot.from_servers(4, {}).peers == {}


# ---- peers.placement ----


def test_coverage():
    assert coverage(4, []) == [0, 0, 0, 0]
    assert coverage(4, [(0, 2), (1, 4), (3, 10), (-2, 1)]) == [2, 2, 1, 2]
    assert coverage(3, [(5, 9)]) == [0, 0, 0]


def test_choose_span_first_uncovered_window():
    assert choose_span(8, 3, [0] * 8) == (0, 3)
    assert choose_span(8, 3, [1, 1, 0, 0, 0, 1, 1, 1]) == (2, 5)
    assert choose_span(8, 2, coverage(8, [(0, 4)])) == (4, 6)
    assert choose_span(8, 4, coverage(8, [(0, 4)])) == (4, 8)


def test_choose_span_prefers_more_uncovered_blocks():
    # block 0 is uncovered, but the window at 3 has two uncovered blocks
    assert choose_span(8, 3, [0, 1, 1, 1, 0, 0, 1, 1]) == (3, 6)
    # any uncovered block beats a window of low but non-zero coverage
    assert choose_span(8, 4, [0, 5, 5, 5, 1, 1, 1, 1]) == (0, 4)
    # fully covered swarm: the least covered window
    assert choose_span(6, 2, [3, 3, 1, 2, 2, 2]) == (2, 4)


def test_choose_span_clamps_length():
    assert choose_span(4, 10, [0, 0, 0, 0]) == (0, 4)
    assert choose_span(4, 4, [2, 0, 1, 3]) == (0, 4)
    assert choose_span(1, 1, [7]) == (0, 1)


@pytest.mark.parametrize("length", [0, -1, -10])
def test_choose_span_rejects_bad_length(length):
    with pytest.raises(ValueError):
        choose_span(8, length, [0] * 8)


def test_allowed_and_blocked_peers():
    snap = snapshot(8, (A, 0, 8, 10.0), (B, 0, 4, 1.0), (C, 4, 8, 1.0), (D, 4, 8, 5.0))
    assert excluded_peers(snap) == set()
    assert excluded_peers(snap, allowed={B, C}) == {A, D}
    assert excluded_peers(snap, blocked={A}, banned={D}) == {A, D}
    assert fewest_hops_route(snap, 0, 8, exclude=excluded_peers(snap, allowed={B, C, D})) == [
        RouteSpan(B, 0, 4),
        RouteSpan(D, 4, 8),
    ]
    with pytest.raises(NoRouteError) as info:
        fewest_hops_route(snap, 0, 8, exclude=excluded_peers(snap, allowed={B}))
    assert info.value.uncovered == [4, 5, 6, 7]


def test_client_config_rejects_bad_peer_ids():
    from swarm import ClientConfig

    with pytest.raises(ValueError, match="is not a peer ID"):
        ClientConfig(blocked_peers=["not-a-peer-id!"])
    ClientConfig(allowed_peers=[A.to_base58()], blocked_peers=[B.to_base58()])


# ---- latency and throughput policies ----


def test_min_latency_prefers_the_peer_with_lower_measured_rtt():
    snap = snapshot(4, (A, 0, 4, 100.0), (B, 0, 4, 100.0))
    assert min_latency_route(snap, 0, 4, rtt={A: 0.050, B: 0.002}, default_rtt=0.01) == [RouteSpan(B, 0, 4)]
    assert min_latency_route(snap, 0, 4, rtt={A: 0.002, B: 0.050}, default_rtt=0.01) == [RouteSpan(A, 0, 4)]
    # unmeasured peers get the default round trip
    assert min_latency_route(snap, 0, 4, rtt={A: 0.050}, default_rtt=0.01) == [RouteSpan(B, 0, 4)]


def test_min_latency_weighs_compute_against_extra_hops():
    # A serves everything but slowly (10 tokens/s over 4 blocks: 0.1 s per token); B and C are fast.
    snap = snapshot(4, (A, 0, 4, 10.0), (B, 0, 2, 1000.0), (C, 2, 4, 1000.0))
    fast = min_latency_route(snap, 0, 4, rtt={}, default_rtt=0.001)
    assert fast == [RouteSpan(B, 0, 2), RouteSpan(C, 2, 4)]
    # with slow links, one hop through the slow peer is cheaper than two network round trips
    assert min_latency_route(snap, 0, 4, rtt={}, default_rtt=0.5) == [RouteSpan(A, 0, 4)]


def test_min_latency_penalizes_full_caches_and_reports_gaps():
    snap = snapshot(4, (A, 0, 4, 100.0), (B, 0, 4, 100.0))
    snap.peers[A] = PeerSpan(A, 0, 4, 100.0, 10, 4096)  # only 10 cache tokens left
    route = min_latency_route(snap, 0, 4, rtt={A: 0.001, B: 0.01}, default_rtt=0.01, tokens_needed=512)
    assert route == [RouteSpan(B, 0, 4)]
    with pytest.raises(NoRouteError) as info:
        min_latency_route(snapshot(4, (A, 0, 2)), 0, 4, rtt={}, default_rtt=0.01)
    assert info.value.uncovered == [2, 3]


def _hop_cost(snap: SwarmSnapshot, rtt: dict, peer: PeerSpan, position: int, reach: int) -> float:
    return rtt[peer.peer_id] + (reach - position) / (peer.throughput * (peer.end - peer.start))


def _best_cost(snap: SwarmSnapshot, rtt: dict, position: int, end: int) -> float:
    """Exhaustive search over every chain of hops from `position` to `end`."""
    if position == end:
        return 0.0
    options = [
        _hop_cost(snap, rtt, p, position, min(p.end, end)) + _best_cost(snap, rtt, min(p.end, end), end)
        for p in snap.peers.values()
        if p.start <= position < p.end
    ]
    return min(options) if options else math.inf


def test_min_latency_matches_brute_force_on_random_snapshots():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 6)
        spans = []
        for peer in IDS[: rng.randint(1, 6)]:
            a = rng.randrange(n)
            spans.append((peer, a, rng.randint(a + 1, n), rng.choice([1.0, 10.0, 100.0])))
        snap = snapshot(n, *spans)
        rtt = {p: rng.choice([0.001, 0.01, 0.1]) for p, *_ in spans}
        expected = _best_cost(snap, rtt, 0, n)
        if math.isinf(expected):
            with pytest.raises(NoRouteError):
                min_latency_route(snap, 0, n, rtt=rtt, default_rtt=0.01)
            continue
        route = min_latency_route(snap, 0, n, rtt=rtt, default_rtt=0.01)
        check_route(snap, route, 0, n)
        cost = sum(_hop_cost(snap, rtt, snap.peers[s.peer_id], s.start, s.end) for s in route)
        assert math.isclose(cost, expected, rel_tol=1e-9)


def test_throughput_weighted_route_spreads_load_by_throughput():
    snap = snapshot(4, (A, 0, 4, 30.0), (B, 0, 4, 10.0))
    rng = random.Random(0)
    picks = [throughput_weighted_route(snap, 0, 4, rng=rng)[0].peer_id for _ in range(4000)]
    assert abs(picks.count(A) / len(picks) - 0.75) < 0.03
    with pytest.raises(NoRouteError):
        throughput_weighted_route(snap, 0, 4, rng=rng, exclude={A, B})


# ---- rebalancing (pure) ----


def test_throughput_coverage_and_effective_throughputs():
    assert throughput_coverage(4, [(0, 2, 10.0), (1, 4, 5.0)]) == [10.0, 15.0, 5.0, 5.0]
    assert effective_throughputs([0.0, 10.0, 30.0, 20.0]) == [20.0, 10.0, 30.0, 20.0]
    assert effective_throughputs([0.0, 0.0]) == [1.0, 1.0]


def test_spans_of_others_skip_offline_peers_and_oneself():
    found = peer_announcements(
        block_servers(
            (A, [0, 1], _record(0, 2, throughput=10.0), 100.0),
            (B, [2, 3], _record(2, 4, state="joining", throughput=0.0), 100.0),  # coming, not measured yet
            (C, [0, 1, 2, 3], _record(0, 4, state="offline", throughput=50.0), 100.0),
            (D, [1, 3], _record(1, 4, throughput=30.0), 100.0),  # block 2's record lapsed: only block 1 counts
            (E, [3], _record(3, 4, throughput=99.0), 100.0),  # the peer asking
        )
    )
    assert sorted(spans_of_others(found, me=E)) == [(0, 2, 10.0), (1, 2, 30.0), (2, 4, 20.0)]  # B: the median


def test_choose_span_goes_where_throughput_is_weakest():
    # blocks 0-3 are served by a fast peer, 4-7 by a slow one: a new peer helps the slow half
    cov = throughput_coverage(8, [(0, 4, 100.0), (4, 8, 10.0)])
    assert choose_span(8, 4, cov, own=50.0) == (4, 8)
    assert choose_span(8, 2, cov, own=50.0) == (4, 6)


def test_plan_move_fills_a_gap_left_by_a_dead_peer():
    # A serves 0-2, B served 2-4 but died; C (0-2) is not the only holder of its blocks, so it moves to the gap
    assert plan_move(4, (0, 2), [(0, 2, 10.0)], own=10.0) == (2, 4)


def test_plan_move_never_uncovers_a_block():
    # C is the only server of blocks 0-1: even a large gain elsewhere does not make it leave them
    assert plan_move(4, (0, 2), [(2, 4, 1.0)], own=100.0) is None
    assert plan_move(6, (0, 2), [(1, 4, 5.0)], own=5.0) is None  # block 0 only on C


def test_plan_move_needs_a_large_enough_gain():
    others = [(0, 2, 10.0), (2, 4, 10.0)]
    # C on 0-2: weakest block now 10 (blocks 2-3); after moving to 2-4 the weakest is 10 (blocks 0-1): no gain
    assert plan_move(4, (0, 2), others, own=10.0) is None
    # a fast peer on 2-4 and a slow one on 0-2: C on 2-4 should go help blocks 0-1 (weakest 1 -> 11)
    assert plan_move(4, (2, 4), [(0, 2, 1.0), (2, 4, 100.0)], own=10.0) == (0, 2)
    # a small gain is not worth a move: weakest 9 now vs 10 after, with balance_quality 0.75
    assert plan_move(4, (2, 4), [(0, 2, 9.0), (2, 4, 9.5)], own=1.0, balance_quality=0.75) is None


def test_plan_move_random_swarms_never_uncover_and_never_worsen():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(2, 10)
        others = []
        for _ in range(rng.randint(0, 5)):
            a = rng.randrange(n)
            others.append((a, rng.randint(a + 1, n), rng.choice([1.0, 5.0, 20.0])))
        length = rng.randint(1, n)
        s = rng.randint(0, n - length)
        own = rng.choice([1.0, 5.0, 20.0])
        target = plan_move(n, (s, s + length), others, own)
        if target is None:
            continue
        before = throughput_coverage(n, [*others, (s, s + length, own)])
        after = throughput_coverage(n, [*others, (*target, own)])
        assert all(after[b] > 0 for b in range(n) if before[b] > 0), "a move uncovered a block"
        assert (sum(c <= 0 for c in after), -min(after)) < (sum(c <= 0 for c in before), -min(before))
