"""The client's view of the remote blocks: discovery through the DHT, routes, and calls along a route."""

from __future__ import annotations

import logging
import time

import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P

from dht.announce import fetch_block_servers
from dht.node import start_dht_node
from dht.records import check_prefix, make_validators
from swarm.config import ClientConfig
from swarm.routing import NoRouteError, RouteSpan, SwarmSnapshot, fewest_hops_route
from swarm.transport import LoopThread, call_forward

logger = logging.getLogger(__name__)


class RemoteSequence:
    """Blocks [0, num_blocks) of one model, served by the swarm under `prefix`."""

    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int, hidden_size: int):
        self.config, self.prefix = config, check_prefix(prefix)
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        self.dht = start_dht_node(
            config.initial_peers,
            config.host_maddrs,
            record_validators=make_validators(prefix, num_blocks, RSASignatureValidator()),
            client_mode=True,
        )
        self.loop = LoopThread()
        self.p2p: P2P = self.loop.run(self.dht.replicate_p2p())
        self._snapshot: SwarmSnapshot | None = None
        self._snapshot_time = 0.0

    # ---- discovery ----

    def snapshot(self, refresh: bool = False) -> SwarmSnapshot:
        if refresh or self._snapshot is None or time.monotonic() - self._snapshot_time > self.config.snapshot_ttl:
            servers = fetch_block_servers(self.dht, self.prefix, range(self.num_blocks))
            self._snapshot = SwarmSnapshot.from_servers(self.num_blocks, servers)
            self._snapshot_time = time.monotonic()
        return self._snapshot

    def make_route(self, min_length: int = 1) -> list[RouteSpan]:
        """A route over all blocks; waits up to discovery_timeout for the swarm to cover every block."""
        deadline = time.monotonic() + self.config.discovery_timeout
        refresh = False
        while True:
            try:
                route = fewest_hops_route(self.snapshot(refresh=refresh), 0, self.num_blocks, min_length=min_length)
                logger.debug(f"route: {[(str(s.peer_id)[-6:], s.uid) for s in route]}")
                return route
            except NoRouteError as e:
                if time.monotonic() > deadline:
                    raise NoRouteError(e.uncovered, self.prefix, e.min_length) from None
                time.sleep(0.5)
                refresh = True

    # ---- whole-sequence forward ----

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run all blocks on hidden [batch, seq, hidden_size] (no cache)."""
        route = self.make_route(min_length=hidden.shape[1])
        wire = hidden.to(self.config.wire_dtype)
        for span in route:
            wire = self.loop.run(
                call_forward(
                    self.p2p, span.peer_id, span.uid, wire, self.config.max_message_bytes, self.config.request_timeout
                )
            )
        return wire.to(hidden.dtype)

    def shutdown(self) -> None:
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.loop.stop()
        self.dht.shutdown()
