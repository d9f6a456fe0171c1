"""The client's remote blocks: the swarm view, peer health and route planning of one model, and the whole-sequence
forward through them (differentiable, see swarm.autograd)."""

from __future__ import annotations

import torch

from blocks.adapters import Adapters
from blocks.fingerprint import ModelWeights
from dht.records import check_prefix
from privacy.exposure import ExposureKind, ExposureLedger
from swarm.autograd import SpanCalls, apply_span
from swarm.config import ClientConfig
from swarm.failover import Failover
from swarm.health import PeerHealth
from swarm.planner import RoutePlanner, RoutePolicy
from swarm.routing import RouteSpan
from swarm.spot_checks import SpotChecker
from swarm.swarm_view import SwarmView
from swarm.transport import PeerError


class RemoteSequence:
    """Blocks [remote_start, remote_end) of one model of `num_blocks` blocks, served by the swarm under `prefix`
    (the rest, if any, run on the client: ClientConfig.local_blocks).

    Its parts: `view` (DHT, P2P, snapshots, background refresh), `health` (bans, RTTs), `planner` (routes) and
    `calls` (forward / backward RPCs per span), `checker` (spot checks of peers' outputs, with every peer's record);
    `ledger` records which peer saw which activations. With `weights`, only peers announcing the same block
    weights are used (SwarmView).
    """

    def __init__(
        self,
        config: ClientConfig,
        prefix: str,
        num_blocks: int,
        hidden_size: int,
        remote_blocks: range | None = None,
        weights: ModelWeights | None = None,
    ):
        self.config, self.prefix = config, check_prefix(prefix)
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        remote_blocks = range(num_blocks) if remote_blocks is None else remote_blocks
        self.remote_start, self.remote_end = remote_blocks.start, remote_blocks.stop
        self.ledger = ExposureLedger()  # every request that showed a peer some of our activations
        self.health = PeerHealth(config)
        self.view = SwarmView(config, prefix, num_blocks, self.health, weights)
        self.planner = RoutePlanner(self.view, self.health, config)
        # spot checks of peers' outputs (ClientConfig.check_rate); routes prefer peers that passed checks
        self.checker = SpotChecker(self.view, self.planner, self.health, config, self.record_exposure)
        if config.check_rate > 0:
            self.planner.penalties = self.checker.penalties
        self.calls = SpanCalls(self.view, self.planner, self.health, config, self.record_exposure, self.checker)
        self.p2p, self.loop, self.dht = self.view.p2p, self.view.loop, self.view.dht

    def make_route(
        self,
        min_length: int = 1,
        start: int | None = None,
        end: int | None = None,
        timeout: float | None = None,
        policy: RoutePolicy = "latency",
        tokens_needed: int = 0,
        min_batch: int = 1,
    ) -> list[RouteSpan]:
        """A route over blocks [start, end) (default: all remote blocks); see RoutePlanner.make_route."""
        start = self.remote_start if start is None else start
        end = self.remote_end if end is None else end
        return self.planner.make_route(start, end, min_length, timeout, policy, tokens_needed, min_batch)

    def record_exposure(self, span: RouteSpan, tokens: int, kind: ExposureKind, *also: ExposureLedger) -> None:
        for ledger in (self.ledger, *also):
            ledger.record(span.peer_id.to_base58(), span.start, span.end, tokens, kind)

    def forward(self, hidden: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
        """Run the remote blocks on hidden [batch, seq, hidden_size] (no cache) with the client's adapters (deep
        prompts indexed from adapters.first_block); differentiable. A failed peer's span is re-run elsewhere."""
        adapters = adapters or Adapters()
        block = self.remote_start
        failover = Failover(self.health, self.config, "forward")
        while block < self.remote_end:
            span = self.make_route(hidden.shape[1], start=block, timeout=failover.route_timeout, policy="throughput")[0]
            try:
                hidden = apply_span(self.calls, span, hidden, adapters.select(span.start, span.end))
            except PeerError as e:
                failover.failed(e)
                continue
            self.health.succeeded(span.peer_id)
            block = span.end
        return hidden

    def shutdown(self) -> None:
        self.view.shutdown()
