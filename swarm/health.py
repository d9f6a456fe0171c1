"""What the client knows about each peer's health: failures with their growing bans, measured round trips, which
peers it has reached at all, and how fast it has seen each peer compute."""

from __future__ import annotations

import logging
import time

from hivemind.p2p import PeerID

from swarm.config import ClientConfig
from swarm.routing import observed_block_rate

logger = logging.getLogger(__name__)
RTT_SMOOTHING = 0.2  # weight of a new round-trip sample in the moving average


class PeerHealth:
    """Bans (a backoff that doubles with each failure in a row, reset when the peer answers) and round-trip times
    (moving averages, with when each was last measured). Thread-safe enough for its users: single assignments."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self._failures: dict[PeerID, int] = {}
        self._banned_until: dict[PeerID, float] = {}
        self._rtt: dict[PeerID, float] = {}
        self._rtt_time: dict[PeerID, float] = {}  # when each peer's RTT was last measured (monotonic)
        self._banned_forever: dict[PeerID, str] = {}  # peers caught lying by a spot check -> why
        self._reached: set[PeerID] = set()  # peers that answered at least once (a probe or a call)
        self._unreachable: set[PeerID] = set()  # peers that could not be reached since they last answered
        self._block_rate: dict[PeerID, float] = {}  # best observed blocks/s (routing.observed_block_rate)

    def ban(self, peer_id: PeerID) -> float:
        """Avoid a peer that failed, for a backoff that doubles with each failure in a row; returns its length."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        backoff = min(self.config.ban_seconds * 2 ** (failures - 1), self.config.max_ban_seconds)
        self._banned_until[peer_id] = time.monotonic() + backoff
        logger.info(f"avoiding peer {peer_id} for {backoff:.0f} s after {failures} failure(s) in a row")
        return backoff

    def ban_forever(self, peer_id: PeerID, reason: str) -> None:
        """Never use this peer again in this client (it was caught returning wrong outputs): no backoff ends it."""
        self._banned_forever[peer_id] = reason
        logger.warning(f"banning peer {peer_id} for the client's lifetime: {reason}")

    def banned_forever(self) -> dict[PeerID, str]:
        return dict(self._banned_forever)

    def succeeded(self, peer_id: PeerID) -> None:
        """A peer answered: its next failure starts the backoff from the beginning again."""
        if self._failures:
            self._failures.pop(peer_id, None)
        self.answered(peer_id)

    # ---- reachability: a peer counts only once it has answered ----

    def answered(self, peer_id: PeerID) -> None:
        """A peer answered a probe or a call: it is reached, and no longer unreachable."""
        self._reached.add(peer_id)
        self._unreachable.discard(peer_id)

    def unreachable(self, peer_id: PeerID) -> float:
        """A peer could not be reached (no route to it, the dial failed or timed out). It stays out of routes until
        it answers a probe; it is also banned with the usual backoff, which spaces the background probes of it.
        Returns the ban's length."""
        self._unreachable.add(peer_id)
        return self.ban(peer_id)

    def unreachable_peers(self) -> set[PeerID]:
        return set(self._unreachable)

    def reached(self) -> set[PeerID]:
        return set(self._reached)

    def never_tried(self, peers: list[PeerID]) -> list[PeerID]:
        """Those of `peers` never reached and never found unreachable: nothing is known about them yet."""
        return [p for p in peers if p not in self._reached and p not in self._unreachable]

    def due_for_reprobe(self, peers: list[PeerID]) -> list[PeerID]:
        """Those of `peers` that are unreachable and whose ban (the probe backoff) has run out."""
        banned = self.banned()
        return [p for p in peers if p in self._unreachable and p not in banned]

    # ---- compute speed as the client observed it ----

    def observe_compute(self, peer_id: PeerID, blocks: int, seconds: float) -> None:
        """A call ran `blocks` of the peer's blocks in `seconds` (client wall time): keep the best rate seen."""
        rate = observed_block_rate(blocks, seconds)
        if rate > self._block_rate.get(peer_id, 0.0):
            self._block_rate[peer_id] = rate

    def block_rates(self) -> dict[PeerID, float]:
        return dict(self._block_rate)

    def failures_in_a_row(self, peer_id: PeerID) -> int:
        return self._failures.get(peer_id, 0)

    def banned(self) -> set[PeerID]:
        now = time.monotonic()
        # a copy: probes on the network thread ban peers while other threads plan routes
        banned_until = list(self._banned_until.items())
        return {peer for peer, until in banned_until if until > now} | set(self._banned_forever)

    def observe_rtt(self, peer_id: PeerID, seconds: float) -> None:
        """Fold a measured network round trip to a peer into its moving average (used by latency routing)."""
        previous = self._rtt.get(peer_id)
        self._rtt[peer_id] = seconds if previous is None else (1 - RTT_SMOOTHING) * previous + RTT_SMOOTHING * seconds
        self._rtt_time[peer_id] = time.monotonic()
        self.answered(peer_id)

    def rtt(self) -> dict[PeerID, float]:
        return dict(self._rtt)

    def least_recently_measured(self, peers: list[PeerID], count: int) -> list[PeerID]:
        """Up to `count` of `peers` that are not banned, the least recently measured first."""
        banned = self.banned()
        candidates = sorted((p for p in peers if p not in banned), key=lambda p: self._rtt_time.get(p, 0.0))
        return candidates[:count]
