"""Training through remote blocks: a torch autograd function per span of the route, backed by RPCs.

The forward of a span sends its input hidden states (and the client's deep prompts / LoRA tensors for those
blocks) to one peer; the client keeps the input. By default (ClientConfig.hold_activations) it goes through the
peer's train call: the peer keeps the autograd graph while that call's stream stays open, and the backward sends
the output gradient on the same stream, so nothing is computed twice. Otherwise, or when the peer has no room to
hold the graph or fails before the backward, the backward goes to any peer serving those blocks through the
stateless backward call: it carries the span's input and output gradient, and the peer recomputes the forward
with autograd. Either returns the gradient w.r.t. the input and each client tensor. A failed backward is re-routed
like a failed forward: if the replacement route splits the span over several peers, the client first re-runs the
forward through all but the last of them to get their inputs. Batches are cut into chunks of at most
`ClientConfig.max_train_tokens` tokens per request, sent concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from blocks.adapters import PROMPTS, is_per_example, select_tensors
from swarm.routing import RouteSpan
from swarm.transport import PeerError, TrainCall, call_backward, call_forward

if TYPE_CHECKING:
    from swarm.sequence import RemoteSequence

logger = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
T = TypeVar("T")


def chunk_slices(batch: int, tokens: int, max_tokens: int) -> list[slice]:
    """Consecutive slices of the batch of at most max_tokens tokens each (at least one example per slice)."""
    per_chunk = max(1, max_tokens // tokens)
    return [slice(i, min(i + per_chunk, batch)) for i in range(0, batch, per_chunk)]


def _chunk_tensors(tensors: Tensors, rows: slice) -> Tensors:
    return {name: t[rows] if is_per_example(name, t) else t for name, t in tensors.items()}


def _merge_grads(tensors: Tensors, per_chunk: list[Tensors]) -> Tensors:
    """Shared tensors: the chunks' gradients summed; per-example tensors: concatenated along the batch."""
    merged = {}
    for name, t in tensors.items():
        parts = [g[name] for g in per_chunk]
        merged[name] = torch.cat(parts) if is_per_example(name, t) else torch.stack(parts).sum(0)
    return merged


def _assemble(
    answers: list[list[torch.Tensor]], hidden: torch.Tensor, tensors: Tensors
) -> tuple[torch.Tensor, Tensors]:
    """Per-chunk backward answers [grad_in, *tensor grads] -> (grad_in, tensor grads), in the callers' dtypes."""
    grad_in = torch.cat([a[0] for a in answers]).to(hidden.dtype)
    per_chunk = [dict(zip(tensors, a[1:], strict=True)) for a in answers]
    return grad_in, {n: g.to(tensors[n].dtype) for n, g in _merge_grads(tensors, per_chunk).items()}


class SpanCalls:
    """Chunked forward / backward calls of a RemoteSequence's spans, with backward failover."""

    def __init__(self, sequence: RemoteSequence):
        self.sequence = sequence
        self.config = sequence.config

    def _wire(self, tensors: Tensors) -> Tensors:
        return {n: t.detach().to(self.config.wire_dtype) for n, t in tensors.items()}

    def _each_chunk(
        self, hidden: torch.Tensor, call: Callable[[slice], Awaitable[T]], chunks: list[slice] | None = None
    ) -> list[T]:
        """`call(rows)` for every chunk of the batch (default: cut by max_train_tokens), concurrently."""
        if chunks is None:
            chunks = chunk_slices(hidden.shape[0], hidden.shape[1], self.config.max_train_tokens)

        async def run() -> list[T]:
            return await asyncio.gather(*(call(rows) for rows in chunks))

        return self.sequence.loop.run(run())

    def forward(self, span: RouteSpan, hidden: torch.Tensor, tensors: Tensors, lora_scale: float) -> torch.Tensor:
        """Blocks of `span` on its peer; no autograd here (SpanFunction wires it up)."""
        wire, wire_tensors, cfg = hidden.detach().to(self.config.wire_dtype), self._wire(tensors), self.config
        outputs = self._each_chunk(
            hidden,
            lambda rows: call_forward(
                self.sequence.p2p, span.peer_id, span.uid, wire[rows], cfg.max_message_bytes, cfg.request_timeout,
                _chunk_tensors(wire_tensors, rows), lora_scale,
            ),
        )  # fmt: skip
        self.sequence.record_exposure(span, hidden.shape[0] * hidden.shape[1], "forward")
        return torch.cat(outputs).to(hidden.dtype)

    def _backward_span(
        self, span: RouteSpan, hidden: torch.Tensor, grad: torch.Tensor, tensors: Tensors, lora_scale: float
    ) -> tuple[torch.Tensor, Tensors]:
        wire, wire_tensors, cfg = hidden.detach().to(self.config.wire_dtype), self._wire(tensors), self.config
        wire_grad = grad.to(cfg.wire_dtype)
        answers = self._each_chunk(
            hidden,
            lambda rows: call_backward(
                self.sequence.p2p, span.peer_id, span.uid, wire[rows], wire_grad[rows], cfg.max_message_bytes,
                cfg.request_timeout, _chunk_tensors(wire_tensors, rows), lora_scale,
            ),
        )  # fmt: skip
        self.sequence.record_exposure(span, hidden.shape[0] * hidden.shape[1], "backward")
        return _assemble(answers, hidden, tensors)

    def forward_held(
        self, span: RouteSpan, hidden: torch.Tensor, tensors: Tensors, lora_scale: float
    ) -> tuple[torch.Tensor, list[tuple[slice, TrainCall]]]:
        """Like `forward`, through train calls: peers that can hold the autograd graph until the backward do so.
        Returns the output and each chunk's rows with its call."""
        wire, wire_tensors, cfg = hidden.detach().to(self.config.wire_dtype), self._wire(tensors), self.config
        chunks = chunk_slices(hidden.shape[0], hidden.shape[1], cfg.max_train_tokens)
        calls = {
            rows.start: TrainCall(self.sequence.p2p, span.peer_id, span.uid, cfg.max_message_bytes, cfg.request_timeout)
            for rows in chunks
        }

        async def call(rows: slice) -> torch.Tensor:
            try:
                return await calls[rows.start].forward(wire[rows], _chunk_tensors(wire_tensors, rows), lora_scale)
            except BaseException:
                await asyncio.gather(*(c.close() for c in calls.values()))  # free what the other peers hold
                raise

        outputs = self._each_chunk(hidden, call, chunks)
        self.sequence.record_exposure(span, hidden.shape[0] * hidden.shape[1], "forward")
        return torch.cat(outputs).to(hidden.dtype), [(rows, calls[rows.start]) for rows in chunks]

    def backward_held(
        self,
        span: RouteSpan,
        held: list[tuple[slice, TrainCall]],
        hidden: torch.Tensor,
        grad: torch.Tensor,
        tensors: Tensors,
    ) -> tuple[torch.Tensor, Tensors]:
        """The backward of a `forward_held` whose peer held every chunk's graph (no recomputation)."""
        wire_grad = grad.to(self.config.wire_dtype)
        calls = {rows.start: call for rows, call in held}

        async def call(rows: slice) -> list[torch.Tensor]:
            try:
                return await calls[rows.start].backward(wire_grad[rows])
            except BaseException:
                await asyncio.gather(*(c.close() for c in calls.values()))
                raise

        answers = self._each_chunk(hidden, call, [rows for rows, _ in held])
        self.sequence.record_exposure(span, hidden.shape[0] * hidden.shape[1], "backward")
        return _assemble(answers, hidden, tensors)

    def backward(
        self, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor, tensors: Tensors, lora_scale: float
    ) -> tuple[torch.Tensor, Tensors]:
        """Gradients of blocks [start, end) given their input and output gradient, on whichever peers serve them
        now; a failed peer is avoided and the blocks re-routed."""
        failures = 0
        while True:
            timeout = None if failures == 0 else self.config.failover_timeout
            route = self.sequence.make_route(
                min_length=hidden.shape[1], start=start, end=end, timeout=timeout, policy="throughput"
            )
            try:
                return self._backward_route(route, start, hidden, grad, tensors, lora_scale)
            except PeerError as e:
                failures += 1
                if failures > self.config.max_failovers:
                    raise
                logger.warning(f"backward through blocks {start}:{end} failed ({e}); trying another peer")
                self.sequence.ban(e.peer_id)

    def _backward_route(
        self,
        route: list[RouteSpan],
        start: int,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        tensors: Tensors,
        lora_scale: float,
    ) -> tuple[torch.Tensor, Tensors]:
        inputs = [hidden]
        for span in route[:-1]:  # the replacement splits the blocks: recompute the inner inputs
            sub = select_tensors(tensors, span.start, span.end, start)
            inputs.append(self.forward(span, inputs[-1], sub, lora_scale))
        grads = {n: torch.zeros_like(t) for n, t in tensors.items()}
        for span, x in zip(reversed(route), reversed(inputs), strict=True):
            sub = select_tensors(tensors, span.start, span.end, start)
            grad, sub_grads = self._backward_span(span, x, grad, sub, lora_scale)
            self.sequence.succeeded(span.peer_id)
            for name, g in sub_grads.items():
                if name != PROMPTS:
                    grads[name] += g
                elif g.dim() == 3:
                    grads[name][span.start - start : span.end - start] += g
                else:
                    grads[name][:, span.start - start : span.end - start] += g
        return grad, grads


class SpanFunction(torch.autograd.Function):
    """y = blocks [span.start, span.end)(hidden; tensors), computed by a peer, differentiable in hidden and tensors."""

    @staticmethod
    def forward(
        ctx: Any,
        calls: SpanCalls,
        span: RouteSpan,
        names: tuple[str, ...],
        lora_scale: float,
        hidden: torch.Tensor,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        named = dict(zip(names, tensors, strict=True))
        ctx.held = []
        if calls.config.hold_activations:
            output, ctx.held = calls.forward_held(span, hidden, named, lora_scale)
        else:
            output = calls.forward(span, hidden, named, lora_scale)
        ctx.calls, ctx.span, ctx.names, ctx.lora_scale = calls, span, names, lora_scale
        ctx.save_for_backward(hidden, *tensors)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, *tensors = ctx.saved_tensors
        named = dict(zip(ctx.names, tensors, strict=True))
        calls, span, held = ctx.calls, ctx.span, ctx.held
        ctx.held = []
        result = None
        if held and all(call.held for _, call in held):
            try:
                result = calls.backward_held(span, held, hidden, grad_output, named)
                calls.sequence.succeeded(span.peer_id)
            except PeerError as e:  # e.g. the peer died since the forward: recompute elsewhere
                logger.warning(f"backward through blocks {span.uid} on the forward's peer failed ({e}); re-routing")
                calls.sequence.ban(e.peer_id)
        if result is None:
            for _, call in held:
                calls.sequence.loop.run(call.close())
            result = calls.backward(span.start, span.end, hidden, grad_output, named, ctx.lora_scale)
        grad_in, grads = result
        return (None, None, None, None, grad_in, *(grads[n] for n in ctx.names))


def apply_span(
    calls: SpanCalls, span: RouteSpan, hidden: torch.Tensor, tensors: Tensors, lora_scale: float
) -> torch.Tensor:
    """The span's output; differentiable when autograd is on and the input or a tensor requires grad."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(t.requires_grad for t in tensors.values()))
    if not needs_grad:
        return calls.forward(span, hidden, tensors, lora_scale)
    return SpanFunction.apply(calls, span, tuple(tensors), lora_scale, hidden, *tensors.values())
