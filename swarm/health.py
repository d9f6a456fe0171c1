"""What the client knows about each peer's health: failures with their growing bans, and measured round trips."""

from __future__ import annotations

import logging
import time

from hivemind.p2p import PeerID

from swarm.config import ClientConfig

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

    def ban(self, peer_id: PeerID) -> float:
        """Avoid a peer that failed, for a backoff that doubles with each failure in a row; returns its length."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        backoff = min(self.config.ban_seconds * 2 ** (failures - 1), self.config.max_ban_seconds)
        self._banned_until[peer_id] = time.monotonic() + backoff
        logger.info(f"avoiding peer {peer_id} for {backoff:.0f} s after {failures} failure(s) in a row")
        return backoff

    def succeeded(self, peer_id: PeerID) -> None:
        """A peer answered: its next failure starts the backoff from the beginning again."""
        if self._failures:
            self._failures.pop(peer_id, None)

    def failures_in_a_row(self, peer_id: PeerID) -> int:
        return self._failures.get(peer_id, 0)

    def banned(self) -> set[PeerID]:
        now = time.monotonic()
        return {peer for peer, until in self._banned_until.items() if until > now}

    def observe_rtt(self, peer_id: PeerID, seconds: float) -> None:
        """Fold a measured network round trip to a peer into its moving average (used by latency routing)."""
        previous = self._rtt.get(peer_id)
        self._rtt[peer_id] = seconds if previous is None else (1 - RTT_SMOOTHING) * previous + RTT_SMOOTHING * seconds
        self._rtt_time[peer_id] = time.monotonic()

    def rtt(self) -> dict[PeerID, float]:
        return dict(self._rtt)

    def least_recently_measured(self, peers: list[PeerID], count: int) -> list[PeerID]:
        """Up to `count` of `peers` that are not banned, the least recently measured first."""
        banned = self.banned()
        candidates = sorted((p for p in peers if p not in banned), key=lambda p: self._rtt_time.get(p, 0.0))
        return candidates[:count]
