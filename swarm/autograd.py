"""Training through remote blocks: a torch autograd function per span of the route, backed by RPCs.

The forward of a span sends its input hidden states (and the client's adapters for those blocks) to one peer; the
client keeps the input. By default (ClientConfig.hold_activations) it goes through the peer's train call: the peer
keeps the autograd graph while that call's stream stays open, and the backward sends the output gradient on the
same stream, so nothing is computed twice. Otherwise, or when the peer has no room to hold the graph or fails
before the backward, the backward goes to any peer serving those blocks through the stateless backward call: it
carries the span's input and output gradient, and the peer recomputes the forward with autograd. Either returns
the gradient w.r.t. the input and each adapter tensor. A failed backward is re-routed like a failed forward: if
the replacement route splits the span over several peers, the client first re-runs the forward through all but
the last of them to get their inputs. Batches are cut into chunks within the size limits the peer announced and
`ClientConfig.max_train_tokens` (swarm.limits), sent concurrently; a peer's refusal of a request over one of its
limits is judged an error of the request where it is one (RequestTooLargeError: no ban, no failover).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch
from hivemind.p2p import PeerID

from blocks.adapters import DEEP_PROMPTS, Adapters, is_per_example
from peers.wire import Backward, Forward, Gradients
from privacy.exposure import ExposureKind
from swarm.config import ClientConfig
from swarm.failover import Failover
from swarm.health import PeerHealth
from swarm.limits import RequestKind, batch_chunks, judge_refusal
from swarm.planner import RoutePlanner
from swarm.routing import RouteSpan
from swarm.spot_checks import SpotChecker, raise_for
from swarm.swarm_view import SwarmView
from swarm.transport import PeerError, TrainCall, call_backward, call_forward

logger = logging.getLogger(__name__)
T = TypeVar("T")
RecordExposure = Callable[[RouteSpan, int, ExposureKind], None]


def _merge(adapters: Adapters, per_chunk: list[Adapters]) -> Adapters:
    """Gradients of the chunks: shared tensors' summed, per-example tensors' concatenated along the batch."""
    merged = {}
    for name, t in adapters.tensors.items():
        parts = [g.tensors[name] for g in per_chunk]
        merged[name] = torch.cat(parts) if is_per_example(name, t) else torch.stack(parts).sum(0)
    return adapters.replace(merged)


def _assemble(answers: list[Gradients], hidden: torch.Tensor, adapters: Adapters) -> tuple[torch.Tensor, Adapters]:
    """Per-chunk answers -> (input gradient, adapter gradients), in the callers' dtypes."""
    grad_in = torch.cat([a.grad_input for a in answers]).to(hidden.dtype)
    grads = _merge(adapters, [a.adapters for a in answers])
    return grad_in, grads.replace({n: g.to(adapters.tensors[n].dtype) for n, g in grads.tensors.items()})


class SpanCalls:
    """Chunked forward / backward calls of spans of the route, with backward failover."""

    def __init__(
        self,
        view: SwarmView,
        planner: RoutePlanner,
        health: PeerHealth,
        config: ClientConfig,
        record: RecordExposure,
        checker: SpotChecker | None = None,
    ):
        self.view, self.planner, self.health, self.config, self.record = view, planner, health, config, record
        self.checker = checker  # spot checks of a sampled fraction of forwards and backwards

    def _wire(self, hidden: torch.Tensor, adapters: Adapters) -> tuple[torch.Tensor, Adapters]:
        dtype = self.config.wire_dtype
        return hidden.detach().to(dtype), adapters.detach().to(dtype)

    def _chunks(self, peer_id: PeerID, hidden: torch.Tensor, kind: RequestKind) -> list[slice]:
        """Row slices of `hidden` for requests of `kind` to the peer, each within the limits it announced."""
        peer = self.view.peer(peer_id)
        return batch_chunks(hidden.shape[0], hidden.shape[1], peer, kind, self.config.max_train_tokens)

    async def _judged(self, peer_id: PeerID, hidden: torch.Tensor, call: Awaitable[T]) -> T:
        """`call`, a request on `hidden` to the peer; a refusal over one of its size limits that the request really
        is over raises RequestTooLargeError (no PeerError: nobody is banned, nothing re-routed)."""
        try:
            return await call
        except PeerError as e:
            judged = judge_refusal(e, hidden.shape[0], hidden.shape[1], self.view.peer(peer_id))
            if judged is e:
                raise
            raise judged from e

    def _each_chunk(self, call: Callable[[slice], Awaitable[T]], chunks: list[slice]) -> list[T]:
        """`call(rows)` for every chunk of the batch, concurrently."""

        async def run() -> list[T]:
            return await asyncio.gather(*(call(rows) for rows in chunks))

        return self.view.loop.run(run())

    def _request(self, span: RouteSpan, wire: torch.Tensor, adapters: Adapters, rows: slice) -> Forward:
        return Forward(span.start, span.end, wire[rows], adapters.rows(rows))

    async def _forward_chunks(self, span: RouteSpan, wire: torch.Tensor, wire_adapters: Adapters) -> torch.Tensor:
        """The span's output from its peer, the batch cut to its limits (async: also a spot check's)."""
        cfg, p2p = self.config, self.view.p2p
        chunks = self._chunks(span.peer_id, wire, "forward")
        began = time.perf_counter()
        outputs = await asyncio.gather(
            *(
                self._judged(span.peer_id, wire[rows], call_forward(
                    p2p, span.peer_id, self._request(span, wire, wire_adapters, rows), cfg.max_message_bytes,
                    cfg.request_timeout,
                ))
                for rows in chunks
            )
        )  # fmt: skip
        # what the client saw of the peer's speed: its announced throughput counts only up to a multiple of it
        self.health.observe_compute(span.peer_id, span.end - span.start, time.perf_counter() - began)
        return torch.cat(outputs)

    def forward(self, span: RouteSpan, hidden: torch.Tensor, adapters: Adapters) -> torch.Tensor:
        """Blocks of `span` on its peer; no autograd here (SpanFunction wires it up)."""
        wire, wire_adapters = self._wire(hidden, adapters)
        output = self.view.loop.run(self._forward_chunks(span, wire, wire_adapters))
        self.record(span, hidden.shape[0] * hidden.shape[1], "forward")
        self._check_forward(span, wire, wire_adapters, output)
        return output.to(hidden.dtype)

    def _check_forward(self, span: RouteSpan, wire: torch.Tensor, wire_adapters: Adapters, output: torch.Tensor):
        """Spot-check a sampled forward on a replica; PeerLiedError (re-routable) if its peer was caught lying."""
        if self.checker is None or not self.checker.sample():
            return
        evidence = self.checker.check_sync(
            "forward",
            span,
            f"forward of {wire.shape[0]}x{wire.shape[1]} tokens",
            [output],
            lambda replica: self._recompute_forward(replica, wire, wire_adapters),
            wire.shape[1],
            wire.shape[0] * wire.shape[1],
        )
        raise_for(evidence, span.peer_id, reroutable=True)

    async def _recompute_forward(self, span: RouteSpan, wire: torch.Tensor, wire_adapters: Adapters):
        return [await self._forward_chunks(span, wire, wire_adapters)]

    def _backward_span(
        self, span: RouteSpan, hidden: torch.Tensor, grad: torch.Tensor, adapters: Adapters
    ) -> tuple[torch.Tensor, Adapters]:
        wire, wire_adapters = self._wire(hidden, adapters)
        wire_grad, cfg, p2p = grad.to(self.config.wire_dtype), self.config, self.view.p2p

        def request(rows: slice) -> Backward:
            return Backward(span.start, span.end, wire[rows], wire_grad[rows], wire_adapters.rows(rows))

        def call(rows: slice) -> Awaitable[Gradients]:
            answer = call_backward(p2p, span.peer_id, request(rows), cfg.max_message_bytes, cfg.request_timeout)
            return self._judged(span.peer_id, wire[rows], answer)

        answers = self._each_chunk(call, self._chunks(span.peer_id, hidden, "backward"))
        self.record(span, hidden.shape[0] * hidden.shape[1], "backward")
        result = _assemble(answers, hidden, adapters)
        self.check_backward(span, hidden, grad, adapters, result)
        return result

    def check_backward(
        self, span: RouteSpan, hidden: torch.Tensor, grad: torch.Tensor, adapters: Adapters,
        result: tuple[torch.Tensor, Adapters],
    ) -> None:  # fmt: skip
        """Spot-check a sampled backward (held or stateless) with a replica's stateless backward; PeerLiedError
        (re-routable) if the span's peer was caught lying."""
        if self.checker is None or not self.checker.sample():
            return
        wire, wire_adapters = self._wire(hidden, adapters)
        wire_grad, cfg, p2p = grad.to(self.config.wire_dtype), self.config, self.view.p2p

        async def recompute(replica: RouteSpan) -> list[torch.Tensor]:
            answers = await asyncio.gather(
                *(
                    self._judged(replica.peer_id, wire[rows], call_backward(
                        p2p, replica.peer_id,
                        Backward(span.start, span.end, wire[rows], wire_grad[rows], wire_adapters.rows(rows)),
                        cfg.max_message_bytes, cfg.request_timeout,
                    ))
                    for rows in self._chunks(replica.peer_id, hidden, "backward")
                )
            )  # fmt: skip
            grad_in, grads = _assemble(list(answers), hidden, adapters)
            return [grad_in, *grads.values]

        grad_in, grads = result
        evidence = self.checker.check_sync(
            "backward",
            span,
            f"backward of {hidden.shape[0]}x{hidden.shape[1]} tokens",
            [grad_in, *grads.values],
            recompute,
            hidden.shape[1],
            hidden.shape[0] * hidden.shape[1],
        )
        raise_for(evidence, span.peer_id, reroutable=True)

    def forward_held(
        self, span: RouteSpan, hidden: torch.Tensor, adapters: Adapters
    ) -> tuple[torch.Tensor, list[tuple[slice, TrainCall]]]:
        """Like `forward`, through train calls: peers that can hold the autograd graph until the backward do so.
        Returns the output and each chunk's rows with its call."""
        wire, wire_adapters = self._wire(hidden, adapters)
        cfg = self.config
        chunks = self._chunks(span.peer_id, hidden, "train")
        calls = {
            rows.start: TrainCall(self.view.p2p, span.peer_id, cfg.max_message_bytes, cfg.request_timeout)
            for rows in chunks
        }

        async def call(rows: slice) -> torch.Tensor:
            try:
                request = self._request(span, wire, wire_adapters, rows)
                return await self._judged(span.peer_id, wire[rows], calls[rows.start].forward(request))
            except BaseException:
                await asyncio.gather(*(c.close() for c in calls.values()))  # free what the other peers hold
                raise

        outputs = self._each_chunk(call, chunks)
        self.record(span, hidden.shape[0] * hidden.shape[1], "forward")
        output = torch.cat(outputs)
        try:
            self._check_forward(span, wire, wire_adapters, output)
        except BaseException:
            self.view.loop.run(asyncio.gather(*(c.close() for c in calls.values())))  # free the held graphs now
            raise
        return output.to(hidden.dtype), [(rows, calls[rows.start]) for rows in chunks]

    def backward_held(
        self, span: RouteSpan, held: list[tuple[slice, TrainCall]], hidden: torch.Tensor, grad: torch.Tensor,
        adapters: Adapters,
    ) -> tuple[torch.Tensor, Adapters]:  # fmt: skip
        """The backward of a `forward_held` whose peer held every chunk's graph (no recomputation)."""
        wire_grad = grad.to(self.config.wire_dtype)
        calls = {rows.start: call for rows, call in held}

        async def call(rows: slice) -> Gradients:
            try:
                return await self._judged(span.peer_id, wire_grad[rows], calls[rows.start].backward(wire_grad[rows]))
            except BaseException:
                await asyncio.gather(*(c.close() for c in calls.values()))
                raise

        answers = self._each_chunk(call, [rows for rows, _ in held])
        self.record(span, hidden.shape[0] * hidden.shape[1], "backward")
        return _assemble(answers, hidden, adapters)

    def backward(
        self, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor, adapters: Adapters
    ) -> tuple[torch.Tensor, Adapters]:
        """Gradients of blocks [start, end) given their input and output gradient, on whichever peers serve them
        now; a failed peer is avoided and the blocks re-routed."""

        def attempt(timeout: float | None) -> tuple[torch.Tensor, Adapters]:
            route = self.planner.make_route(start, end, hidden.shape[1], timeout, policy="throughput")
            return self._backward_route(route, start, hidden, grad, adapters)

        return Failover(self.health, self.config, f"backward through blocks {start}:{end}").run(attempt)

    def _backward_route(
        self, route: list[RouteSpan], start: int, hidden: torch.Tensor, grad: torch.Tensor, adapters: Adapters
    ) -> tuple[torch.Tensor, Adapters]:
        inputs = [hidden]
        for span in route[:-1]:  # the replacement splits the blocks: recompute the inner inputs
            inputs.append(self.forward(span, inputs[-1], adapters.select(span.start, span.end)))
        grads = {n: torch.zeros_like(t) for n, t in adapters.tensors.items()}
        for span, x in zip(reversed(route), reversed(inputs), strict=True):
            grad, sub_grads = self._backward_span(span, x, grad, adapters.select(span.start, span.end))
            self.health.succeeded(span.peer_id)
            for name, g in sub_grads.tensors.items():
                if name != DEEP_PROMPTS:
                    grads[name] += g
                elif g.dim() == 3:
                    grads[name][span.start - start : span.end - start] += g
                else:
                    grads[name][:, span.start - start : span.end - start] += g
        return grad, adapters.replace(grads)


class SpanFunction(torch.autograd.Function):
    """y = blocks [span.start, span.end)(hidden; adapters), computed by a peer, differentiable in hidden and the
    adapter tensors."""

    @staticmethod
    def forward(
        ctx: Any, calls: SpanCalls, span: RouteSpan, adapters: Adapters, hidden: torch.Tensor, *tensors: torch.Tensor
    ) -> torch.Tensor:
        adapters = adapters.replace(dict(zip(adapters.names, tensors, strict=True)))
        ctx.held = []
        if calls.config.hold_activations:
            output, ctx.held = calls.forward_held(span, hidden, adapters)
        else:
            output = calls.forward(span, hidden, adapters)
        ctx.calls, ctx.span, ctx.adapters = calls, span, adapters.detach()
        ctx.save_for_backward(hidden, *tensors)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, *tensors = ctx.saved_tensors
        adapters = ctx.adapters.replace(dict(zip(ctx.adapters.names, tensors, strict=True)))
        calls, span, held = ctx.calls, ctx.span, ctx.held
        ctx.held = []
        result = None
        if held and all(call.held for _, call in held):
            try:
                held_result = calls.backward_held(span, held, hidden, grad_output, adapters)
                calls.check_backward(span, hidden, grad_output, adapters, held_result)
                result = held_result
                calls.health.succeeded(span.peer_id)
            except PeerError as e:  # e.g. the peer died since the forward: recompute elsewhere
                logger.warning(f"backward through blocks {span.uid} on the forward's peer failed ({e}); re-routing")
                calls.health.ban(e.peer_id)
        if result is None:
            for _, call in held:
                calls.view.loop.run(call.close())
            result = calls.backward(span.start, span.end, hidden, grad_output, adapters)
        grad_in, grads = result
        return (None, None, None, grad_in, *grads.values)


def apply_span(calls: SpanCalls, span: RouteSpan, hidden: torch.Tensor, adapters: Adapters) -> torch.Tensor:
    """The span's output (adapters selected for its blocks); differentiable when autograd is on and the input or an
    adapter tensor requires grad."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(t.requires_grad for t in adapters.values))
    if not needs_grad:
        return calls.forward(span, hidden, adapters)
    return SpanFunction.apply(calls, span, adapters, hidden, *adapters.values)
