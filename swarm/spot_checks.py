"""Spot checks on the network: a sampled fraction of the work each peer does for this client is done again by another
peer serving the same blocks with the same dtype and quantization, and the outputs compared (swarm.verification
holds the tolerance, the comparison and the judgement).

- whole-sequence forward: the same span input and adapters go to a replica;
- inference step at position p: the replica runs a whole-sequence forward over the span's inputs of the session so
  far (which the client keeps for failover anyway) and its last positions are compared with the step's output;
- backward: the replica's stateless backward of the same input and output gradient.

When the two disagree, a third replica (the arbiter) decides; a peer caught lying is banned for the client's lifetime
and the evidence logged at WARNING. With no arbiter the lie is detected but not attributed: both peers become
suspects (routes avoid them while others exist) and the work fails with VerificationError rather than return an
output that may be false.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import torch
from hivemind.p2p import PeerID

from privacy.exposure import ExposureKind
from swarm.config import ClientConfig
from swarm.health import PeerHealth
from swarm.limits import RequestTooLargeError
from swarm.planner import RoutePlanner
from swarm.routing import PeerSpan, RouteSpan, excluded_peers
from swarm.swarm_view import SwarmView
from swarm.transport import PeerError
from swarm.verification import (
    CheckKind,
    CheckRecords,
    CheckSampler,
    Evidence,
    VerificationError,
    compare_all,
    judge,
    route_penalties,
    tolerance_for,
)

logger = logging.getLogger(__name__)
# Recomputes the checked work on one replica: its outputs, in the order of the primary's.
Recompute = Callable[[RouteSpan], Awaitable[Sequence[torch.Tensor]]]
RecordExposure = Callable[[RouteSpan, int, ExposureKind], None]


class PeerLiedError(PeerError):
    """A spot check proved that this peer's output was wrong (it is banned for good): the work is re-routed."""

    def __init__(self, peer_id: PeerID, evidence: Evidence):
        self.evidence = evidence
        super().__init__(peer_id, f"caught returning wrong outputs: {evidence.describe()}")


class SpotChecker:
    """Samples work to check, finds replicas to check it on, judges, bans liars and keeps every peer's record."""

    def __init__(
        self, view: SwarmView, planner: RoutePlanner, health: PeerHealth, config: ClientConfig, record: RecordExposure
    ):
        self.view, self.planner, self.health, self.config, self.record = view, planner, health, config, record
        self.sampler = CheckSampler(config.check_rate, config.check_seed)
        self.records = CheckRecords()

    def sample(self) -> bool:
        """Whether to check the next piece of work (one span's step, forward or backward)."""
        return self.sampler.should_check()

    def penalties(self) -> dict[PeerID, float]:
        """Routing cost per peer of the current view: routes prefer peers with a record of passed checks."""
        if self.config.check_rate == 0:
            return {}
        peers = {p.to_base58(): p for p in self.view.snapshot().peers}
        costs = route_penalties(self.records.peers, peers, self.config.unchecked_penalty, self.config.suspect_penalty)
        return {peers[name]: cost for name, cost in costs.items()}

    def replicas(self, span: RouteSpan, min_length: int, exclude: set[PeerID]) -> list[PeerSpan]:
        """Peers that can redo `span`'s work exactly as its peer should have: all its blocks, same dtype and quant,
        not banned, blocked or outside the allow-list, and reachable: a phantom record never gives an opinion."""
        snapshot = self.view.snapshot()
        primary = snapshot.peers.get(span.peer_id)
        if primary is None:
            return []
        planner = self.planner
        excluded = excluded_peers(snapshot, planner.allowed, planner.blocked, self.health.banned()) | exclude
        excluded |= planner.not_answered(snapshot)
        return [
            p
            for p in snapshot.peers.values()
            if p.peer_id not in excluded
            and p.start <= span.start
            and span.end <= p.end
            and (p.dtype, p.quant) == (primary.dtype, primary.quant)
            and p.max_length >= min_length
        ]

    async def check(
        self,
        kind: CheckKind,
        span: RouteSpan,
        where: str,
        primary_outputs: Sequence[torch.Tensor],
        recompute: Recompute,
        min_length: int,
        tokens: int,
    ) -> Evidence | None:
        """Redo the work on a replica and judge; None when no replica could give a second opinion. Bans a peer
        caught lying and logs the evidence of every disagreement."""
        candidates = self.replicas(span, min_length, {span.peer_id})
        if not candidates:
            self.records.inconclusive += 1
            logger.debug(f"no replica of blocks {span.uid} to spot-check a {kind} on")
            return None
        snapshot_peer = self.view.snapshot().peers[span.peer_id]
        tolerance = tolerance_for(snapshot_peer.dtype, snapshot_peer.quant, self.config.check_tolerance)
        checker = self.sampler.choose(candidates).peer_id
        checker_outputs = await self._recompute(recompute, span, checker, tokens, kind)
        if checker_outputs is None:
            self.records.inconclusive += 1
            return None
        verdict = compare_all(zip(primary_outputs, checker_outputs, strict=True), tolerance)
        arbiter, arbiter_verdicts = None, None
        if not verdict.agree:
            others = self.replicas(span, min_length, {span.peer_id, checker})
            if others:
                arbiter = self.sampler.choose(others).peer_id
                arbiter_outputs = await self._recompute(recompute, span, arbiter, tokens, kind)
                if arbiter_outputs is None:
                    arbiter = None
                else:
                    arbiter_verdicts = (
                        compare_all(zip(arbiter_outputs, primary_outputs, strict=True), tolerance),
                        compare_all(zip(arbiter_outputs, checker_outputs, strict=True), tolerance),
                    )
        judgement = judge(verdict, *(arbiter_verdicts or (None, None)))
        evidence = Evidence(
            kind,
            span.uid,
            where,
            span.peer_id.to_base58(),
            checker.to_base58(),
            arbiter.to_base58() if arbiter is not None else None,
            judgement.outcome,
            verdict,
            judgement.arbiter_verdicts,
        )
        self.records.add(evidence)
        if judgement.outcome != "passed":
            logger.warning(evidence.describe())
        if evidence.liar is not None:
            self.health.ban_forever(PeerID.from_base58(evidence.liar), evidence.describe())
        return evidence

    async def _recompute(
        self, recompute: Recompute, span: RouteSpan, peer: PeerID, tokens: int, kind: CheckKind
    ) -> Sequence[torch.Tensor] | None:
        replica = RouteSpan(peer, span.start, span.end)
        try:
            outputs = await recompute(replica)
        except (PeerError, RequestTooLargeError) as e:  # no second opinion (the replica failed, or its limits are
            # smaller than the work's sequences): not evidence against anyone
            logger.debug(f"spot check of blocks {span.uid} on {peer} failed: {e}")
            return None
        self.record(replica, tokens, "backward" if kind == "backward" else "forward")
        return outputs

    def check_sync(self, *args, **kwargs) -> Evidence | None:
        """`check` from synchronous code (whole-sequence forward and backward)."""
        return self.view.loop.run(self.check(*args, **kwargs))


def raise_for(evidence: Evidence | None, primary: PeerID, reroutable: bool) -> None:
    """After a check: nothing if the primary's output stands (passed, or the checker lied). A proven lie by the
    primary raises PeerLiedError where the work can be re-routed (failover), else VerificationError, as does an
    unresolved disagreement."""
    if evidence is None or evidence.outcome in ("passed", "checker_lied"):
        return
    if evidence.outcome == "primary_lied" and reroutable:
        raise PeerLiedError(primary, evidence)
    raise VerificationError(evidence)


async def gather_checks(checks: list[asyncio.Task]) -> list[Evidence | None]:
    """Wait for every check of a step; the first error (if any) after all finished."""
    results = await asyncio.gather(*checks, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
