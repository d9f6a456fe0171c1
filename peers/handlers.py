"""The peer's RPC handlers. Each reads like the exchange it serves (see peers.wire.messages): parse the request
into its typed message (validated against the peer's limits), compute, reply. Computation goes through the
ComputeScheduler (peers.scheduler), pushes between peers through the PushRouter (peers.push), held training
graphs through peers.training; what every client stream shares (quotas, frame timeouts, the one error ladder)
through peers.streams.

Each session owns its cache; nothing is shared between sessions but the weights.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from blocks.adapters import Adapters, check_prompt_positions, linear_module, run_span
from blocks.batching import Segment, run_segments
from blocks.span import BlockSpan
from peers import trace
from peers.direct import Connection, DirectListener
from peers.push import Pushed, PushRouter, short_id
from peers.quotas import (
    ClientLedger,
    ClientQuotas,
    Holding,
    QuotaExceeded,
    Resource,
    held_graph_bytes,
    tensor_bytes,
)
from peers.scheduler import BatchSettings, ComputeScheduler
from peers.sessions import CacheBudget, PeerSession
from peers.streams import ClientStreams, ReplyChannel, unless_client_leaves, wire_bytes
from peers.training import HeldGraphs, forward_graph, gradients, recompute_gradients
from peers.wire import (
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PUSH_HANDLER,
    TRAIN_HANDLER,
    Attached,
    Backward,
    Forward,
    ForwardReply,
    Gradients,
    GradOutput,
    OpenSession,
    PeerInfo,
    ProtocolError,
    SessionOpened,
    Step,
    StepReply,
    encode_tensor,
    send_message,
)
from peers.wire.validation import Limits

logger = logging.getLogger(__name__)


class BlockService:
    """Serves one BlockSpan to clients through a hivemind P2P instance."""

    def __init__(
        self,
        span: BlockSpan,
        limits: Limits,
        budget: CacheBudget,
        idle_timeout: float,
        info: dict[str, Any],
        batching: BatchSettings | None = None,
        quotas: ClientQuotas | None = None,
        frame_timeout: float = 60.0,
        slice_tokens: int = 4096,
        direct: DirectListener | None = None,
    ):
        self.span: BlockSpan | None = span
        self.limits, self.budget, self.idle_timeout = limits, budget, idle_timeout
        # what each client holds (streams, sessions, cache tokens, trainables, queued work, message bytes)
        self.ledger = ClientLedger(quotas or ClientQuotas(per_client={}, total={}, memory_budget=2**62))
        self.slice_tokens = slice_tokens
        self.static_info = info
        self.batching = batching or BatchSettings()
        self.scheduler = ComputeScheduler(self.batching, self._run_step_batch)
        self.scheduler.open_sessions = lambda: self.budget.sessions
        self.push = PushRouter(lambda: self.limits.max_message_bytes)
        self.held = HeldGraphs(limits.max_held_tokens)
        self.stats = {"inference_steps": 0, "forward_calls": 0, "backward_calls": 0, "held_backward_calls": 0}
        # errors: requests refused or failed; internal_errors: of those, failures of this peer's code (a bug)
        self.stats |= {"errors": 0, "internal_errors": 0, "refused_pushes": 0, "tokens_processed": 0}
        self.streams = ClientStreams(self.ledger, self.stats, frame_timeout, lambda: self.limits.max_message_bytes)
        # tokens whose activations each block saw (any request kind): lets a client audit its exposure
        self.block_tokens: dict[int, int] = {}
        self._p2p: P2P | None = None
        self.generation = 0  # bumped when the peer moves to other blocks: sessions opened before must end
        self.direct = direct  # offers inference sessions a direct TLS connection (peers.direct)

    # ---- lifecycle ----

    async def start(self, p2p: P2P) -> None:
        self._p2p = p2p
        self.push.attach(p2p)
        await p2p.add_binary_stream_handler(INFERENCE_HANDLER, self._handle_inference)
        await p2p.add_binary_stream_handler(FORWARD_HANDLER, self._handle_forward)
        await p2p.add_binary_stream_handler(BACKWARD_HANDLER, self._handle_backward)
        await p2p.add_binary_stream_handler(TRAIN_HANDLER, self._handle_train)
        await p2p.add_protobuf_handler(INFO_HANDLER, self._handle_info, runtime_pb2.ExpertUID)
        await p2p.add_binary_stream_handler(PUSH_HANDLER, self.push.handle)
        if self.direct is not None:
            await self.direct.start()

    async def suspend(self) -> None:
        """Stop serving the current blocks (the peer is moving): open sessions end, new requests are refused."""
        async with self.scheduler.exclusive():  # not in the middle of a computation
            self.span = None
            self.generation += 1

    async def resume(self, span: BlockSpan, limits: Limits, info: dict[str, Any]) -> None:
        """Serve other blocks from now on, through the same handlers."""
        async with self.scheduler.exclusive():
            self.span, self.limits, self.static_info = span, limits, info
            self.held.max_tokens = limits.max_held_tokens
            self.generation += 1

    async def stop(self) -> None:
        self.push.close()
        if self.direct is not None:
            await self.direct.close()
        if self._p2p is not None:
            for name in (INFERENCE_HANDLER, FORWARD_HANDLER, BACKWARD_HANDLER, TRAIN_HANDLER, PUSH_HANDLER):
                await self._p2p.remove_binary_stream_handler(name)
            await self._p2p.remove_protobuf_handler(INFO_HANDLER)
            await self._p2p.shutdown()  # a replica: closes our connection to the daemon, not the daemon
        self.scheduler.shutdown()

    def _check_serving(self, generation: int | None = None) -> None:
        if self.span is None:
            raise ProtocolError("this peer is moving to other blocks; use another peer")
        if generation is not None and generation != self.generation:
            raise ProtocolError(
                f"this peer now serves blocks {self.limits.start}:{self.limits.end}; the session must move elsewhere"
            )

    # ---- computation (functions run by the scheduler) ----

    async def _compute(self, fn: functools.partial, tokens: int, generation: int, client: str, cost: int = 0) -> Any:
        return await self.scheduler.run(fn, tokens, lambda: self._check_serving(generation), client, cost)

    def _step_input(self, session: PeerSession, hidden: torch.Tensor) -> tuple[PeerSession, torch.Tensor]:
        return session, hidden.to(self.span.device, self.span.dtype)

    def _forward_input(self, forward: Forward) -> tuple[Forward, torch.Tensor]:
        return forward, forward.hidden.to(self.span.device, self.span.dtype)

    def _run_step_batch(self, inputs: list[tuple[PeerSession | Forward, torch.Tensor]]) -> list[torch.Tensor]:
        """One computation for a batch of one group (peers.scheduler): steps of several sessions, each in its own
        cache (blocks.batching), or whole-sequence forwards of one length, stacked along the batch."""
        first = inputs[0][0]
        if isinstance(first, Forward):
            out = run_span(self.span, torch.cat([x for _, x in inputs]), first.start, first.end)
            return list(out.split([x.shape[0] for _, x in inputs]))
        if trace.ENABLED:
            trace.event(trace.place("peer", first.start, first.end), trace.COMPUTE_BEGAN)
        if len(inputs) == 1:
            # A session alone (the common case when decoding): the span's own forward, as transformers computes
            # it, without the segment bookkeeping a batch needs (~0.5 ms of Python per step on a small model).
            session, x = inputs[0]
            outputs = [self.span.forward(x, session.cache, session.position, first.start, first.end)]
        else:
            segments = [Segment(s.cache, x.shape[0], x.shape[1], s.position) for s, x in inputs]
            outputs = run_segments(self.span, [x for _, x in inputs], segments, first.start, first.end)
        for session, x in inputs:
            session.position += x.shape[1]
        if trace.ENABLED:
            trace.event(trace.place("peer", first.start, first.end), trace.COMPUTE_ENDED)
        return outputs

    def _run_blocks(
        self, hidden: torch.Tensor, start: int, end: int, adapters: Adapters, session: PeerSession | None = None
    ) -> torch.Tensor:
        device = next(self.span.parameters()).device
        with torch.inference_mode():
            x = hidden.to(device, self.span.dtype)
            if session is None:
                out = run_span(self.span, x, start, end, adapters.to(self.span.dtype, device))
            else:
                out = run_span(self.span, x, start, end, session.adapters, session.cache, session.position)
                session.position += hidden.shape[1]
            return out.to("cpu", hidden.dtype)

    def _count(self, kind: str | None, start: int, end: int, tokens: int) -> None:
        if kind is not None:
            self.stats[kind] += 1
        self.stats["tokens_processed"] += tokens
        for block in range(start, end):
            self.block_tokens[block] = self.block_tokens.get(block, 0) + tokens

    def _linear_shape(self, block: int, module: str) -> tuple[int, int]:
        linear = linear_module(self.span.layers[block - self.span.start], module)
        return int(linear.in_features), int(linear.out_features)

    # ---- handlers ----

    async def _handle_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        scheduler = self.scheduler
        stats = dict(self.stats, compute_seconds=scheduler.compute_seconds, pushes=self.push.pushes)
        stats |= {"batches": scheduler.batches, "batched_steps": scheduler.batched_steps}
        budget = self.ledger.budget
        stats |= {"memory_budget_used": budget.used, "memory_budget_peak": budget.peak, "clients": self.ledger.clients}
        stats |= {"open_streams": self.ledger.total(Resource.STREAMS)}
        info = PeerInfo(
            **self.static_info,
            cache_tokens_left=self.budget.tokens_left,
            sessions=self.budget.sessions,
            stats=stats,
            block_tokens={str(b): n for b, n in sorted(self.block_tokens.items())},
            batch_sessions=scheduler.last_batch_sessions,
            queue_length=scheduler.queue_length,
        )
        return info.encode()

    async def _handle_forward(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """-> Forward, <- ForwardReply."""
        async with self.streams.client_stream("forward", info, reader, writer) as holding:
            request, generation = await self._first_request(reader, holding)
            holding.take(Resource.TRAINABLE_BYTES, wire_bytes(request, 1))  # refused before they are decoded
            forward = Forward.decode(request, self.limits, self._linear_shape)
            del request  # its tensors are decoded: the message's own copy is not needed any more
            self._take_work(holding, forward)
            output = await unless_client_leaves(reader, self._forward(forward, generation, holding.client))
            await send_message(ForwardReply(output).encode(), writer)

    def _take_work(self, holding: Holding, forward: Forward | Backward) -> None:
        """Count a request's computation against its client's quota (QuotaExceeded: refused)."""
        holding.take(Resource.QUEUED_TOKENS, forward.hidden.shape[0] * forward.hidden.shape[1])

    async def _forward(self, forward: Forward, generation: int, client: str) -> torch.Tensor:
        """A whole-sequence forward, in slices of whole sequences of about slice_tokens tokens, so that other
        clients' work runs in between (FairShare) and a client that leaves stops costing compute at the next
        slice."""
        rows, length = forward.hidden.shape[0], forward.hidden.shape[1]
        per_slice = max(1, self.slice_tokens // length)
        if rows <= per_slice:
            output = await self._forward_slice(forward, generation, client)
        else:
            outputs = []
            for first in range(0, rows, per_slice):
                part = slice(first, first + per_slice)
                piece = Forward(forward.start, forward.end, forward.hidden[part], forward.adapters.rows(part))
                outputs.append(await self._forward_slice(piece, generation, client))
            output = torch.cat(outputs)
        self.stats["forward_calls"] += 1  # a whole request answered (its slices counted their tokens)
        return output

    async def _forward_slice(self, forward: Forward, generation: int, client: str) -> torch.Tensor:
        """Batched with other clients' forwards of the same blocks and length when it has no adapters and fits a
        batch, else alone."""
        tokens = forward.hidden.shape[0] * forward.hidden.shape[1]
        if forward.adapters or tokens > self.batching.max_batch_tokens:
            fn = functools.partial(self._run_blocks, forward.hidden, forward.start, forward.end, forward.adapters)
            output = await self._compute(fn, tokens, generation, client)
        else:
            group = ("forward", forward.start, forward.end, forward.hidden.shape[1])
            prepare = functools.partial(self._forward_input, forward)
            check = functools.partial(self._check_serving, generation)
            output = (await self.scheduler.step(prepare, tokens, group, client, check)).to("cpu", forward.hidden.dtype)
        self._count(None, forward.start, forward.end, tokens)
        return output

    async def _handle_backward(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """-> Backward, <- Gradients. Nothing is kept between calls: the forward is recomputed here."""
        async with self.streams.client_stream("backward", info, reader, writer) as holding:
            request, generation = await self._first_request(reader, holding)
            holding.take(Resource.TRAINABLE_BYTES, wire_bytes(request, 2))
            backward = Backward.decode(request, self.limits, self._linear_shape)
            del request
            self._take_work(holding, backward)
            b = backward
            fn = functools.partial(recompute_gradients, self.span, b.hidden, b.grad_output, b.start, b.end, b.adapters)
            tokens = b.hidden.shape[0] * b.hidden.shape[1]
            # a forward with autograd and its backward: about three forwards of compute
            work = self._compute(fn, tokens, generation, holding.client, 3 * tokens)
            grad_input, *grads = await unless_client_leaves(reader, work)
            self._count("backward_calls", b.start, b.end, tokens)
            reply = Gradients(grad_input, b.adapters.replace(dict(zip(b.adapters.names, grads, strict=True))))
            await send_message(reply.encode(), writer)

    async def _handle_train(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """-> Forward, <- ForwardReply(held); if held: -> GradOutput, <- Gradients from the held graph.

        The graph is kept, for this stream only, until the gradient arrives, the client closes the stream, or
        --train-hold-timeout passes; at most --max-held-tokens tokens over all streams are held: beyond that the
        answer has held=False and the client uses the stateless backward call. This saves the recomputation."""
        held_tokens = 0
        try:
            async with self.streams.client_stream("train", info, reader, writer) as holding:
                request, generation = await self._first_request(reader, holding)
                holding.take(Resource.TRAINABLE_BYTES, wire_bytes(request, 1))
                forward = Forward.decode(request, self.limits, self._linear_shape)
                del request
                self._take_work(holding, forward)
                tokens = forward.hidden.shape[0] * forward.hidden.shape[1]
                if not self._hold_graph(holding, forward, tokens):
                    output = await unless_client_leaves(reader, self._forward(forward, generation, holding.client))
                    await send_message(ForwardReply(output, held=False).encode(), writer)
                    return
                held_tokens = tokens
                f = forward
                fn = functools.partial(forward_graph, self.span, f.hidden, f.start, f.end, f.adapters)
                work = self._compute(fn, tokens, generation, holding.client, 2 * tokens)
                leaves, out = await unless_client_leaves(reader, work)
                self._count("forward_calls", f.start, f.end, tokens)
                reply = ForwardReply(out.detach().to("cpu", f.hidden.dtype), held=True)
                await send_message(reply.encode(), writer)
                async with asyncio.timeout(self.limits.train_hold_timeout):
                    second = await self.streams.receive(reader, holding)
                if second is None:
                    return  # the client needed no backward: the graph is dropped
                grad = GradOutput.decode(second, forward, self.limits).grad_output
                del second
                fn = functools.partial(gradients, leaves, out, grad, f.hidden.dtype)
                work = self._compute(fn, tokens, generation, holding.client, 2 * tokens)
                grad_input, *grads = await unless_client_leaves(reader, work)
                self._count("held_backward_calls", f.start, f.end, tokens)
                reply = Gradients(grad_input, f.adapters.replace(dict(zip(f.adapters.names, grads, strict=True))))
                await send_message(reply.encode(), writer)
        finally:
            self.held.release(held_tokens)

    def _hold_graph(self, holding: Holding, forward: Forward, tokens: int) -> bool:
        """Whether to keep this train call's autograd graph: within --max-backward-tokens and --max-held-tokens,
        and its estimated bytes within the memory budget (else the client uses the stateless backward)."""
        if tokens > self.limits.max_backward_tokens or not self.held.try_hold(tokens):
            return False
        config = self.span.config
        graph = held_graph_bytes(
            tokens,
            forward.hidden.shape[1],
            forward.end - forward.start,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            torch.finfo(self.span.dtype).bits // 8,
        )
        try:
            holding.take(Resource.HELD_BYTES, graph)
        except QuotaExceeded:
            self.held.release(tokens)
            return False
        return True

    async def _handle_inference(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """-> OpenSession, <- SessionOpened, then -> Step / <- StepReply until the client closes the stream, an
        error, or idle_timeout. Steps come from the client or, pushed, from the previous peer of the route (see
        peers.push); a step number seen before is dropped, so each step is computed and answered once."""
        session: PeerSession | None = None
        token: str | None = None
        offer = None
        try:
            replies = ReplyChannel(writer)
            async with self.streams.client_stream("inference session", info, reader, writer, replies) as holding:
                request, generation = await self._first_request(reader, holding)
                holding.take(Resource.SESSIONS, 1)
                holding.take(Resource.TRAINABLE_BYTES, wire_bytes(request, 0))
                opening = OpenSession.decode(request, self.limits, self._linear_shape)
                del request
                holding.take(Resource.CACHE_TOKENS, opening.batch * opening.max_length)
                device = next(self.span.parameters()).device
                adapters = opening.adapters.to(self.span.dtype, device)
                # kept in the span's dtype for the whole session: counted as such
                holding.give_back(Resource.TRAINABLE_BYTES, holding.held(Resource.TRAINABLE_BYTES))
                holding.take(Resource.TRAINABLE_BYTES, tensor_bytes(adapters.values))
                self.budget.reserve(opening.batch * opening.max_length)
                session = PeerSession(
                    opening.start,
                    opening.end,
                    opening.batch,
                    opening.max_length,
                    self.span.new_cache(),
                    adapters=adapters,
                )
                logger.debug(f"session {session.session_id} from {short_id(info.peer_id)}: {opening}")
                opening_direct = opening.direct
                del opening  # the session keeps its adapters (in the span's dtype): not a second copy of them
                holding.give_back(Resource.REQUEST_BYTES, holding.held(Resource.REQUEST_BYTES))
                token, inbox = self.push.open_inbox()
                charges: collections.deque[int] = collections.deque()  # bytes of each client frame in the inbox
                readers = {asyncio.create_task(self._read_client(reader, inbox, holding, charges))}
                serving: asyncio.Task | None = None
                try:
                    arrived = None
                    if opening_direct and self.direct is not None:
                        offer, arrived = self.direct.offer()
                    await send_message(SessionOpened(session.session_id, token, direct=offer).encode(), writer)
                    if arrived is not None:
                        attaching = self._attach(arrived, session.session_id, replies, inbox, holding, charges)
                        readers.add(asyncio.create_task(attaching))
                    client = holding.client
                    steps = self._serve_steps(session, inbox, replies, generation, client, holding, charges)
                    serving = asyncio.create_task(steps)
                    done, _ = await asyncio.wait({*readers, serving}, return_when=asyncio.FIRST_COMPLETED)
                    if not serving.done() and any(task.result() is True for task in done):
                        # The client closed its stream: nobody reads what is still being computed for it. Its
                        # queued work is dropped now, not computed for nothing.
                        serving.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await serving
                finally:
                    for task in (*readers, serving):
                        if task is not None:
                            task.cancel()
                            with contextlib.suppress(BaseException):
                                await task
        finally:
            if offer is not None and self.direct is not None:
                self.direct.withdraw(offer)
            if token is not None:
                self.push.close_inbox(token)
            if session is not None:
                self.scheduler.forget(session.session_id)
                self.budget.release(session.reserved_tokens)
                session.cache = None  # free the KV cache now, not when the handler's frame is collected

    async def _read_client(
        self, reader: asyncio.StreamReader, inbox: asyncio.Queue, holding: Holding, charges: collections.deque[int]
    ) -> bool:
        """Move the client's requests into the session's inbox, then None at the end of the stream (returns True)
        or the error (returns False: the session answers it). Each frame's bytes are charged to the client before
        it is read, in `charges`, until the session served it."""
        while True:
            try:
                before = holding.held(Resource.REQUEST_BYTES)
                request = await self.streams.receive(reader, holding)
                if request is not None:
                    charges.append(holding.held(Resource.REQUEST_BYTES) - before)
            except Exception as e:
                await inbox.put(e)
                return False
            await inbox.put(request)
            if request is None:
                return True

    async def _attach(
        self,
        arrived: asyncio.Future[Connection],
        session_id: int,
        replies: ReplyChannel,
        inbox: asyncio.Queue,
        holding: Holding,
        charges: collections.deque[int],
    ) -> bool:
        """Once the client's direct connection presents the session's ticket: answer Attached on it, send every
        later reply through it and read the client's steps from it (as _read_client). Until then, nothing."""
        reader, writer = await arrived
        await send_message(Attached(session_id).encode(), writer)
        replies.direct(writer)
        logger.debug(f"session {session_id} attached a direct connection")
        return await self._read_client(reader, inbox, holding, charges)

    async def _step(self, session: PeerSession, hidden: torch.Tensor, generation: int, client: str) -> torch.Tensor:
        """A session's step: alone when it carries adapters (their hooks act on whole batches); otherwise through
        the batching scheduler, a long prompt in chunks of prefill_chunk_tokens so that other sessions' steps run
        in between."""
        check = functools.partial(self._check_serving, generation)
        rows, length = hidden.shape[0], hidden.shape[1]
        if session.adapters:
            fn = functools.partial(self._run_blocks, hidden, session.start, session.end, None, session)
            return await self.scheduler.run(fn, rows * length, check, client)
        chunk = max(1, self.batching.prefill_chunk_tokens // rows)
        outputs = []
        for offset in range(0, length, chunk):
            piece = hidden if length <= chunk else hidden[:, offset : offset + chunk]
            prepare = functools.partial(self._step_input, session, piece)
            group = (session.start, session.end)
            out = await self.scheduler.step(prepare, rows * piece.shape[1], group, client, check, session.session_id)
            outputs.append(out.to("cpu", hidden.dtype))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _accept_step(self, session: PeerSession, request: runtime_pb2.ExpertRequest, last_step: int) -> Step | None:
        """Decode and check a step of `session`, and prepare its cache (a position behind it rewinds it); None if
        the step's number was seen already."""
        step = Step.decode(request, self.limits, session.batch, session.max_length)
        if step.step is not None and step.step <= last_step:
            return None
        tokens = step.hidden.shape[1]
        if session.adapters.prompt_length:
            try:
                check_prompt_positions(session.adapters.prompt_length, step.position, tokens)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
        session.prepare_step(step.position, tokens)
        return step

    async def _serve_steps(
        self,
        session: PeerSession,
        inbox: asyncio.Queue,
        replies: ReplyChannel,
        generation: int,
        client: str,
        holding: Holding,
        charges: collections.deque[int],
    ) -> None:
        last_step = -1
        where = trace.place("peer", session.start, session.end)
        served = 0  # bytes charged for the client's frame served last: given back once it is answered
        while True:
            holding.give_back(Resource.REQUEST_BYTES, served)
            served = 0
            async with asyncio.timeout(self.idle_timeout):  # unlike wait_for, no extra task per step
                request = await inbox.get()
            if request is None:
                return
            if isinstance(request, BaseException):
                raise request
            if trace.ENABLED:
                trace.event(where, trace.RECEIVED)
            pushed = isinstance(request, Pushed)
            if not pushed and charges:
                served = charges.popleft()
            try:
                step = self._accept_step(session, request.request if pushed else request, last_step)
            except ProtocolError as e:
                if not pushed:
                    raise  # the client's own mistake ends its session
                # A neighbour's bad push: dropped alone; the client sends the step itself after its grace time.
                self.stats["refused_pushes"] += 1
                logger.info(f"dropped a step pushed into session {session.session_id}: {e}")
                continue
            if step is None:
                continue  # the second copy of a step (pushed and also sent by the client): done already
            if step.step is not None:
                last_step = step.step
            tokens = step.hidden.shape[1]
            if trace.ENABLED:
                trace.event(where, trace.ACCEPTED, step.step)
            began = time.perf_counter()
            output = await self._step(session, step.hidden, generation, client)
            compute_s = time.perf_counter() - began
            if trace.ENABLED:
                trace.event(where, trace.COMPUTED, step.step)
            self.stats["inference_steps"] += 1
            self._count(None, session.start, session.end, step.hidden.shape[0] * tokens)
            encoded = encode_tensor(output)  # once, for the next peer and for the client
            if step.push:
                await self.push.push(step, encoded)
                if trace.ENABLED:
                    trace.event(where, trace.PUSHED, step.step)
            # session.position is the cache's length: BlockSpan checks every layer it used against it
            reply = StepReply(encoded, session.position, compute_s, step.step)
            await send_message(reply.encode(), replies.writer)
            if trace.ENABLED:
                trace.event(where, trace.REPLIED, step.step)

    async def _first_request(
        self, reader: asyncio.StreamReader, holding: Holding
    ) -> tuple[runtime_pb2.ExpertRequest, int]:
        """The stream's first request (peers.streams) and the serving generation it arrived in."""
        request = await self.streams.first_request(reader, holding)
        self._check_serving()
        return request, self.generation
