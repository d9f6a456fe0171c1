"""The peer's RPC handlers. Each reads like the exchange it serves (see peers.wire.messages): parse the request
into its typed message (validated against the peer's limits), compute, reply. Computation goes through the
ComputeScheduler (peers.compute), pushes between peers through the PushRouter (peers.push), held training
graphs through peers.training; errors are answered by one ladder (`_answering_errors`).

Each session owns its cache; nothing is shared between sessions but the weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from blocks.adapters import Adapters, check_prompt_positions, linear_module, run_span
from blocks.batching import Segment, run_segments
from blocks.span import BlockSpan
from peers.push import PushRouter, short_id
from peers.scheduler import BatchSettings, ComputeScheduler
from peers.sessions import CacheBudget, PeerSession
from peers.training import HeldGraphs, forward_graph, gradients, recompute_gradients
from peers.wire import (
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PUSH_HANDLER,
    TRAIN_HANDLER,
    Backward,
    Forward,
    ForwardReply,
    Gradients,
    GradOutput,
    OpenSession,
    PeerInfo,
    ProtocolError,
    RemoteError,
    SessionOpened,
    Step,
    StepReply,
    encode_tensor,
    receive_message,
    send_error,
    send_message,
)
from peers.wire.validation import Limits

logger = logging.getLogger(__name__)
ERROR_DRAIN_SECONDS = 2.0  # after an error, how long to read (and drop) what the client is still sending


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
    ):
        self.span: BlockSpan | None = span
        self.limits, self.budget, self.idle_timeout = limits, budget, idle_timeout
        self.static_info = info
        self.batching = batching or BatchSettings()
        self.scheduler = ComputeScheduler(self.batching, self._run_step_batch)
        self.scheduler.open_sessions = lambda: self.budget.sessions
        self.push = PushRouter(lambda: self.limits.max_message_bytes)
        self.held = HeldGraphs(limits.max_held_tokens)
        self.stats = {"inference_steps": 0, "forward_calls": 0, "backward_calls": 0, "held_backward_calls": 0}
        self.stats |= {"errors": 0, "tokens_processed": 0}
        # tokens whose activations each block saw (any request kind): lets a client audit its exposure
        self.block_tokens: dict[int, int] = {}
        self._p2p: P2P | None = None
        self.generation = 0  # bumped when the peer moves to other blocks: sessions opened before must end

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

    async def _compute(self, fn: functools.partial, tokens: int, generation: int) -> Any:
        return await self.scheduler.run(fn, tokens, check=lambda: self._check_serving(generation))

    def _step_input(self, session: PeerSession, hidden: torch.Tensor) -> tuple[PeerSession, torch.Tensor]:
        device = next(self.span.parameters()).device
        return session, hidden.to(device, self.span.dtype)

    def _forward_input(self, forward: Forward) -> tuple[Forward, torch.Tensor]:
        device = next(self.span.parameters()).device
        return forward, forward.hidden.to(device, self.span.dtype)

    def _run_step_batch(self, inputs: list[tuple[PeerSession | Forward, torch.Tensor]]) -> list[torch.Tensor]:
        """One computation for a batch of one group (peers.scheduler): steps of several sessions, each in its own
        cache (blocks.batching), or whole-sequence forwards of one length, stacked along the batch."""
        first = inputs[0][0]
        if isinstance(first, Forward):
            out = run_span(self.span, torch.cat([x for _, x in inputs]), first.start, first.end)
            return list(out.split([x.shape[0] for _, x in inputs]))
        segments = [Segment(s.cache, x.shape[0], x.shape[1], s.position) for s, x in inputs]
        outputs = run_segments(self.span, [x for _, x in inputs], segments, first.start, first.end)
        for session, x in inputs:
            session.position += x.shape[1]
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
        async with self._answering_errors("forward", info, reader, writer):
            request, generation = await self._first_request(reader)
            forward = Forward.decode(request, self.limits, self._linear_shape)
            output = await self._forward(forward, generation, info.peer_id.to_base58())
            await send_message(ForwardReply(output).encode(), writer)

    async def _forward(self, forward: Forward, generation: int, client: str) -> torch.Tensor:
        """A whole-sequence forward: batched with other clients' forwards of the same blocks and length when it has
        no adapters and fits a batch, else alone."""
        tokens = forward.hidden.shape[0] * forward.hidden.shape[1]
        if forward.adapters or tokens > self.batching.max_batch_tokens:
            fn = functools.partial(self._run_blocks, forward.hidden, forward.start, forward.end, forward.adapters)
            output = await self._compute(fn, tokens, generation)
        else:
            group = ("forward", forward.start, forward.end, forward.hidden.shape[1])
            prepare = functools.partial(self._forward_input, forward)
            check = functools.partial(self._check_serving, generation)
            output = (await self.scheduler.step(prepare, tokens, group, client, check)).to("cpu", forward.hidden.dtype)
        self._count("forward_calls", forward.start, forward.end, tokens)
        return output

    async def _handle_backward(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """-> Backward, <- Gradients. Nothing is kept between calls: the forward is recomputed here."""
        async with self._answering_errors("backward", info, reader, writer):
            request, generation = await self._first_request(reader)
            backward = Backward.decode(request, self.limits, self._linear_shape)
            b = backward
            fn = functools.partial(recompute_gradients, self.span, b.hidden, b.grad_output, b.start, b.end, b.adapters)
            tokens = b.hidden.shape[0] * b.hidden.shape[1]
            grad_input, *grads = await self._compute(fn, tokens, generation)
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
            async with self._answering_errors("train", info, reader, writer):
                request, generation = await self._first_request(reader)
                forward = Forward.decode(request, self.limits, self._linear_shape)
                tokens = forward.hidden.shape[0] * forward.hidden.shape[1]
                if tokens > self.limits.max_backward_tokens or not self.held.try_hold(tokens):
                    output = await self._forward(forward, generation, info.peer_id.to_base58())
                    await send_message(ForwardReply(output, held=False).encode(), writer)
                    return
                held_tokens = tokens
                f = forward
                fn = functools.partial(forward_graph, self.span, f.hidden, f.start, f.end, f.adapters)
                leaves, out = await self._compute(fn, tokens, generation)
                self._count("forward_calls", f.start, f.end, tokens)
                reply = ForwardReply(out.detach().to("cpu", f.hidden.dtype), held=True)
                await send_message(reply.encode(), writer)
                async with asyncio.timeout(self.limits.train_hold_timeout):
                    second = await receive_message(
                        reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes
                    )
                if second is None:
                    return  # the client needed no backward: the graph is dropped
                grad = GradOutput.decode(second, forward, self.limits).grad_output
                fn = functools.partial(gradients, leaves, out, grad, f.hidden.dtype)
                grad_input, *grads = await self._compute(fn, tokens, generation)
                self._count("held_backward_calls", f.start, f.end, tokens)
                reply = Gradients(grad_input, f.adapters.replace(dict(zip(f.adapters.names, grads, strict=True))))
                await send_message(reply.encode(), writer)
        finally:
            self.held.release(held_tokens)

    async def _handle_inference(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """-> OpenSession, <- SessionOpened, then -> Step / <- StepReply until the client closes the stream, an
        error, or idle_timeout. Steps come from the client or, pushed, from the previous peer of the route (see
        peers.push); a step number seen before is dropped, so each step is computed and answered once."""
        session: PeerSession | None = None
        token: str | None = None
        try:
            async with self._answering_errors("inference session", info, reader, writer):
                request, generation = await self._first_request(reader)
                opening = OpenSession.decode(request, self.limits, self._linear_shape)
                device = next(self.span.parameters()).device
                adapters = opening.adapters.to(self.span.dtype, device)
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
                token, inbox = self.push.open_inbox()
                reading = asyncio.create_task(self._read_client(reader, inbox))
                serving: asyncio.Task | None = None
                try:
                    await send_message(SessionOpened(session.session_id, token).encode(), writer)
                    client = info.peer_id.to_base58()
                    serving = asyncio.create_task(self._serve_steps(session, inbox, writer, generation, client))
                    await asyncio.wait({reading, serving}, return_when=asyncio.FIRST_COMPLETED)
                    if not serving.done() and reading.result() is True:
                        # The client closed its stream: nobody reads what is still being computed for it. Its
                        # queued work is dropped now, not computed for nothing.
                        serving.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await serving
                finally:
                    for task in (reading, serving):
                        if task is not None:
                            task.cancel()
                            with contextlib.suppress(BaseException):
                                await task
        finally:
            if token is not None:
                self.push.close_inbox(token)
            if session is not None:
                self.scheduler.forget(session.session_id)
                self.budget.release(session.reserved_tokens)
                session.cache = None  # free the KV cache now, not when the handler's frame is collected

    async def _read_client(self, reader: asyncio.StreamReader, inbox: asyncio.Queue) -> bool:
        """Move the client's requests into the session's inbox, then None at the end of the stream (returns True)
        or the error (returns False: the session answers it)."""
        while True:
            try:
                request = await receive_message(
                    reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes
                )
            except Exception as e:
                await inbox.put(e)
                return False
            await inbox.put(request)
            if request is None:
                return True

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
            piece = hidden[:, offset : offset + chunk]
            prepare = functools.partial(self._step_input, session, piece)
            group = (session.start, session.end)
            out = await self.scheduler.step(prepare, rows * piece.shape[1], group, client, check, session.session_id)
            outputs.append(out.to("cpu", hidden.dtype))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _serve_steps(
        self, session: PeerSession, inbox: asyncio.Queue, writer: asyncio.StreamWriter, generation: int, client: str
    ) -> None:
        last_step = -1
        while True:
            async with asyncio.timeout(self.idle_timeout):  # unlike wait_for, no extra task per step
                request = await inbox.get()
            if request is None:
                return
            if isinstance(request, BaseException):
                raise request
            step = Step.decode(request, self.limits, session.batch, session.max_length)
            if step.step is not None:
                if step.step <= last_step:
                    continue  # the second copy of a step (pushed and also sent by the client): done already
                last_step = step.step
            tokens = step.hidden.shape[1]
            if session.adapters.prompt_length:
                try:
                    check_prompt_positions(session.adapters.prompt_length, step.position, tokens)
                except ValueError as e:
                    raise ProtocolError(str(e)) from None
            session.prepare_step(step.position, tokens)
            began = time.perf_counter()
            output = await self._step(session, step.hidden, generation, client)
            compute_s = time.perf_counter() - began
            self.stats["inference_steps"] += 1
            self._count(None, session.start, session.end, step.hidden.shape[0] * tokens)
            encoded = encode_tensor(output)  # once, for the next peer and for the client
            if step.push:
                await self.push.push(step, encoded)
            # session.position is the cache's length: BlockSpan checks every layer it used against it
            reply = StepReply(encoded, session.position, compute_s, step.step)
            await send_message(reply.encode(), writer)

    # ---- requests and errors ----

    async def _first_request(self, reader: asyncio.StreamReader) -> tuple[runtime_pb2.ExpertRequest, int]:
        """The stream's first request and the serving generation it arrived in; ConnectionError if none came."""
        async with asyncio.timeout(self.idle_timeout):
            request = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes)
        if request is None:
            raise ConnectionError("the stream ended before a request")
        self._check_serving()
        return request, self.generation

    @contextlib.asynccontextmanager
    async def _answering_errors(
        self, kind: str, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AsyncIterator[None]:
        """Answer whatever goes wrong while serving a stream with an error frame naming it; close the stream."""
        peer = short_id(info.peer_id)
        try:
            yield
        except (ProtocolError, RemoteError) as e:
            self.stats["errors"] += 1
            logger.info(f"{kind} from {peer} refused: {e}")
            await _try_send_error(str(e), writer, reader)
        except TimeoutError:
            logger.info(f"{kind} from {peer}: nothing arrived within its timeout")
            await _try_send_error(f"{kind} closed: nothing arrived within its timeout", writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug(f"{kind} from {peer}: connection lost")
        except Exception as e:
            self.stats["errors"] += 1
            logger.exception(f"{kind} from {peer} failed")
            await _try_send_error(f"internal error: {type(e).__name__}: {e}", writer)
        finally:
            writer.close()


async def _try_send_error(text: str, writer: asyncio.StreamWriter, reader: asyncio.StreamReader | None = None) -> None:
    try:
        await send_error(text, writer)
    except Exception:  # the client may be gone already; its side reports the failure
        logger.debug("could not deliver an error to the client", exc_info=True)
        return
    if reader is not None:
        # A client still sending (e.g. an oversized message) only reads our error once it finished writing; closing
        # right away would reset the stream and lose the error. Drain without storing, for a bounded time.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_discard_until_eof(reader), timeout=ERROR_DRAIN_SECONDS)


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(2**16):
        pass
