"""The peer's RPC handlers: a bidirectional inference stream per session, a whole-sequence forward, an info call,
and for training through the swarm a stateless backward (recomputes the forward) and a train call (a forward and
its backward on one stream, the autograd graph held only while that call is open). Forward, backward and train
requests may carry the client's deep prompts and LoRA tensors (blocks.adapters), checked by peers.validation.

One computation runs at a time. Small steps (decoding) run right on the event loop, where a thread hand-off would
cost more than the step; larger ones run on a dedicated compute thread so the loop keeps reading requests and
answering info calls meanwhile. Each session owns its cache; nothing is shared between sessions but the weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from blocks.adapters import PROMPTS, check_prompt_positions, linear_module, run_span
from blocks.span import BlockSpan
from peers.protocol import (
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_VERSION,
    PUSH_HANDLER,
    TRAIN_HANDLER,
    WIRE_DTYPES,
    ProtocolError,
    RemoteError,
    decode_metadata,
    decode_tensor,
    encode_metadata,
    encode_tensor,
    get_int,
    get_push_chain,
    get_step,
    make_response,
    receive_message,
    send_error,
    send_message,
)
from peers.sessions import CacheBudget, PeerSession
from peers.validation import (
    Limits,
    check_backward_size,
    check_forward_size,
    check_hidden,
    check_trainables,
    get_lora_scale,
    parse_span_uid,
)

logger = logging.getLogger(__name__)
ERROR_DRAIN_SECONDS = 2.0  # after an error, how long to read (and drop) what the client is still sending
INBOX_SIZE = 4  # requests queued per session (client's and pushed); further pushes are dropped, the client resends
PUSH_CONNECT_TIMEOUT = 5.0  # seconds to open a push stream to the next peer


class BlockService:
    """Serves one BlockSpan to clients through a hivemind P2P instance."""

    def __init__(
        self,
        span: BlockSpan,
        limits: Limits,
        budget: CacheBudget,
        idle_timeout: float,
        info: dict[str, Any],
        inline_compute_tokens: int = 0,
    ):
        self.span, self.limits, self.budget = span, limits, budget
        self.idle_timeout = idle_timeout
        self.inline_compute_tokens = inline_compute_tokens
        self._compute_lock = asyncio.Lock()
        self.static_info = info
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.device = next(span.parameters()).device
        self.stats = {
            "inference_steps": 0,
            "forward_calls": 0,
            "backward_calls": 0,
            "held_backward_calls": 0,  # backward calls answered from a held graph (no recomputation)
            "errors": 0,
            "tokens_processed": 0,
            "compute_seconds": 0.0,
            "pushes": 0,
        }
        # tokens whose activations each block saw (any request kind): lets a client audit its exposure
        self.block_tokens: dict[int, int] = {}
        self._held_tokens = 0  # tokens of autograd graphs held by open train calls
        self._p2p: P2P | None = None
        self.generation = 0  # bumped when the peer moves to other blocks: sessions opened before must end
        self._inboxes: dict[str, asyncio.Queue] = {}  # push token -> the session's queue of requests
        self._push_streams: dict[PeerID, tuple[asyncio.StreamWriter, asyncio.Lock]] = {}
        self._push_tasks: set[asyncio.Task] = set()

    async def suspend(self) -> None:
        """Stop serving the current blocks (the peer is moving): open sessions end, new requests are refused."""
        async with self._compute_lock:  # not in the middle of a computation
            self.span = None
            self.generation += 1

    async def resume(self, span: BlockSpan, limits: Limits, info: dict[str, Any]) -> None:
        """Serve other blocks from now on, through the same handlers."""
        async with self._compute_lock:
            self.span, self.limits, self.static_info = span, limits, info
            self.device = next(span.parameters()).device
            self.generation += 1

    def _check_serving(self, generation: int | None = None) -> None:
        if self.span is None:
            raise ProtocolError("this peer is moving to other blocks; use another peer")
        if generation is not None and generation != self.generation:
            raise ProtocolError(
                f"this peer now serves blocks {self.limits.start}:{self.limits.end}; the session must move elsewhere"
            )

    async def start(self, p2p: P2P) -> None:
        self._p2p = p2p
        await p2p.add_binary_stream_handler(INFERENCE_HANDLER, self._handle_inference)
        await p2p.add_binary_stream_handler(FORWARD_HANDLER, self._handle_forward)
        await p2p.add_binary_stream_handler(BACKWARD_HANDLER, self._handle_backward)
        await p2p.add_binary_stream_handler(TRAIN_HANDLER, self._handle_train)
        await p2p.add_protobuf_handler(INFO_HANDLER, self._handle_info, runtime_pb2.ExpertUID)
        await p2p.add_binary_stream_handler(PUSH_HANDLER, self._handle_push)

    async def stop(self) -> None:
        for writer, _ in self._push_streams.values():
            writer.close()
        self._push_streams.clear()
        if self._p2p is not None:
            for name in (INFERENCE_HANDLER, FORWARD_HANDLER, BACKWARD_HANDLER, TRAIN_HANDLER, PUSH_HANDLER):
                await self._p2p.remove_binary_stream_handler(name)
            await self._p2p.remove_protobuf_handler(INFO_HANDLER)
            await self._p2p.shutdown()  # a replica: closes our connection to the daemon, not the daemon
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ---- compute (runs on the compute thread) ----

    def _timed(self, fn: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            return fn()
        finally:
            self.stats["compute_seconds"] += time.perf_counter() - began

    def _run_blocks(
        self,
        hidden: torch.Tensor,
        session: PeerSession | None,
        start: int,
        end: int,
        tensors: dict[str, torch.Tensor] | None = None,
        lora_scale: float = 1.0,
    ) -> torch.Tensor:
        wire_dtype = hidden.dtype
        with torch.inference_mode():
            x = hidden.to(self.device, self.span.dtype)
            if session is None:
                tensors = {n: t.to(self.device, self.span.dtype) for n, t in (tensors or {}).items()}
                out = run_span(self.span, x, start, end, tensors, lora_scale)
            else:
                out = run_span(
                    self.span, x, start, end, session.tensors, session.lora_scale, session.cache, session.position
                )
                session.position += hidden.shape[1]
            return out.to("cpu", wire_dtype)

    def _forward_graph(
        self, hidden: torch.Tensor, start: int, end: int, tensors: dict[str, torch.Tensor], lora_scale: float
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Blocks [start, end) with autograd: (leaves [input, *client tensors], output)."""
        with torch.enable_grad():
            x = hidden.to(self.device, self.span.dtype).requires_grad_(True)
            inputs = [t.to(self.device, self.span.dtype).requires_grad_(True) for t in tensors.values()]
            out = run_span(self.span, x, start, end, dict(zip(tensors, inputs, strict=True)), lora_scale)
        return [x, *inputs], out

    @staticmethod
    def _grads(leaves: list[torch.Tensor], out: torch.Tensor, grad_out: torch.Tensor, wire: torch.dtype) -> list:
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.device, out.dtype), allow_unused=True)
        return [(torch.zeros_like(v) if g is None else g).to("cpu", wire) for g, v in zip(grads, leaves, strict=True)]

    def _run_backward(
        self,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        start: int,
        end: int,
        tensors: dict[str, torch.Tensor],
        lora_scale: float,
    ) -> list[torch.Tensor]:
        """Recompute blocks [start, end) with autograd (nothing was kept from the forward) and return the gradients
        w.r.t. the input hidden states and each client tensor, in the order received."""
        leaves, out = self._forward_graph(hidden, start, end, tensors, lora_scale)
        return self._grads(leaves, out, grad_out, hidden.dtype)

    async def _locked(self, fn: Callable[[], Any], tokens: int, generation: int) -> Any:
        async with self._compute_lock:  # one computation at a time, wherever it runs
            self._check_serving(generation)  # the blocks may have changed while this request waited
            if tokens <= self.inline_compute_tokens:
                # A decode step takes about a millisecond: handing it to another thread and back costs two
                # thread wake-ups, a large share of a step on a busy machine, for no gain.
                return self._timed(fn)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._timed, fn)

    async def _compute(
        self, hidden: torch.Tensor, session: PeerSession | None, start: int, end: int, generation: int, **kw: Any
    ) -> torch.Tensor:
        fn = functools.partial(self._run_blocks, hidden, session, start, end, **kw)
        return await self._locked(fn, hidden.shape[0] * hidden.shape[1], generation)

    def _count_call(self, kind: str, start: int, end: int, tokens: int) -> None:
        self.stats[kind] += 1
        self._count_tokens(start, end, tokens)

    def _count_tokens(self, start: int, end: int, tokens: int) -> None:
        self.stats["tokens_processed"] += tokens
        for block in range(start, end):
            self.block_tokens[block] = self.block_tokens.get(block, 0) + tokens

    # ---- handlers ----

    async def _handle_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        info = dict(self.static_info)
        info.update(
            protocol_version=PROTOCOL_VERSION,
            cache_tokens_left=self.budget.tokens_left,
            sessions=self.budget.sessions,
            stats=dict(self.stats),
            block_tokens={str(b): n for b, n in sorted(self.block_tokens.items())},
        )
        return runtime_pb2.ExpertInfo(serialized_info=encode_metadata(info))

    def _read_hidden(self, request: runtime_pb2.ExpertRequest, batch: int | None = None) -> torch.Tensor:
        if len(request.tensors) != 1:
            raise ProtocolError(f"expected exactly 1 tensor (hidden states), got {len(request.tensors)}")
        hidden = decode_tensor(request.tensors[0], max_numel=self.limits.max_numel)
        return check_hidden(hidden, self.limits, batch=batch)

    def _read_trainables(
        self, request: runtime_pb2.ExpertRequest, fixed: int, hidden: torch.Tensor, start: int, end: int
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The client's deep prompts / LoRA tensors after the first `fixed` tensors, checked against this span."""
        meta = decode_metadata(request.metadata)
        extra = [decode_tensor(t, max_numel=self.limits.max_numel) for t in request.tensors[fixed:]]
        names = meta.get("names", [])
        tensors = check_trainables(names, extra, hidden, start, end, self.limits, self._linear_shape)
        return tensors, get_lora_scale(meta)

    def _read_session_trainables(
        self, opening: runtime_pb2.ExpertRequest, batch: int, max_length: int, start: int, end: int
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Deep prompts / LoRA tensors sent with a session's opening request, kept (on the compute device) for the
        session's lifetime, so that generation uses the client's tuned adapters."""
        if not opening.tensors:
            return {}, 1.0
        # Shapes only; an unknown dtype name is refused with a clear error when _read_trainables decodes the tensors.
        dtype = WIRE_DTYPES.get(opening.tensors[0].dtype, torch.float32)
        like = torch.empty(batch, max_length, self.limits.hidden_size, dtype=dtype, device="meta")
        tensors, scale = self._read_trainables(opening, 0, like, start, end)
        return {n: t.to(self.device, self.span.dtype) for n, t in tensors.items()}, scale

    def _read_forward(
        self, request: runtime_pb2.ExpertRequest, start: int, end: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """A forward request's hidden states (checked against the forward limits) and client tensors."""
        if not request.tensors:
            raise ProtocolError("expected the hidden states as the first tensor")
        hidden = check_hidden(decode_tensor(request.tensors[0], max_numel=self.limits.max_numel), self.limits)
        check_forward_size(hidden, self.limits)
        tensors, scale = self._read_trainables(request, 1, hidden, start, end)
        return hidden, tensors, scale

    def _linear_shape(self, block: int, module: str) -> tuple[int, int]:
        linear = linear_module(self.span.layers[block - self.span.start], module)
        return int(linear.in_features), int(linear.out_features)

    async def _handle_forward(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One request (span uid + hidden states [+ deep prompts / LoRA tensors named in metadata 'names']) ->
        one response (output hidden states)."""

        async def serve(request: runtime_pb2.ExpertRequest, start: int, end: int, generation: int) -> list:
            hidden, tensors, scale = self._read_forward(request, start, end)
            output = await self._compute(hidden, None, start, end, generation, tensors=tensors, lora_scale=scale)
            self._count_call("forward_calls", start, end, hidden.shape[0] * hidden.shape[1])
            return [output]

        await self._serve_once("forward", serve, stream_info, reader, writer)

    async def _handle_backward(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One request (span uid; tensors: the span's input hidden states, the gradient w.r.t. its output, then
        the client's named deep prompts / LoRA tensors) -> gradients w.r.t. the input and each client tensor.
        Nothing is kept between calls: the forward is recomputed here."""

        async def serve(request: runtime_pb2.ExpertRequest, start: int, end: int, generation: int) -> list:
            if len(request.tensors) < 2:
                raise ProtocolError("expected the hidden states and the output gradient as the first two tensors")
            hidden, grad = (decode_tensor(t, max_numel=self.limits.max_numel) for t in request.tensors[:2])
            check_hidden(hidden, self.limits)
            check_backward_size(hidden, grad, self.limits)
            tensors, scale = self._read_trainables(request, 2, hidden, start, end)
            fn = functools.partial(self._run_backward, hidden, grad, start, end, tensors, scale)
            tokens = hidden.shape[0] * hidden.shape[1]
            grads = await self._locked(fn, self.inline_compute_tokens + 1, generation)  # always on the compute thread
            self._count_call("backward_calls", start, end, tokens)
            return grads

        await self._serve_once("backward", serve, stream_info, reader, writer)

    async def _handle_train(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A forward and its backward in one call: the request is a forward request; the answer is the output and
        metadata 'held'. If held, the peer keeps the autograd graph, for this stream only, until the client sends
        the output gradient (one tensor) or closes the stream, or for at most --train-hold-timeout seconds; the
        answer to the gradient is the backward's (input gradient, client tensor gradients). This saves the
        backward's recomputation. Graphs are held for at most --max-held-tokens tokens over all streams; beyond
        that, the answer has held=False and the client uses the stateless backward call."""
        held_tokens = 0

        async def serve(request: runtime_pb2.ExpertRequest, start: int, end: int, generation: int) -> list:
            nonlocal held_tokens
            hidden, tensors, scale = self._read_forward(request, start, end)
            tokens = hidden.shape[0] * hidden.shape[1]
            if tokens > self.limits.max_backward_tokens or self._held_tokens + tokens > self.limits.max_held_tokens:
                output = await self._compute(hidden, None, start, end, generation, tensors=tensors, lora_scale=scale)
                self._count_call("forward_calls", start, end, tokens)
                await send_message(make_response([output], {"held": False}), writer)
                return []
            self._held_tokens += tokens
            held_tokens = tokens
            fn = functools.partial(self._forward_graph, hidden, start, end, tensors, scale)
            leaves, out = await self._locked(fn, self.inline_compute_tokens + 1, generation)
            self._count_call("forward_calls", start, end, tokens)
            await send_message(make_response([out.detach().to("cpu", hidden.dtype)], {"held": True}), writer)
            async with asyncio.timeout(self.limits.train_hold_timeout):
                second = await receive_message(
                    reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes
                )
            if second is None:
                return []  # the client needed no backward: the graph is dropped
            if len(second.tensors) != 1:
                raise ProtocolError("expected exactly 1 tensor (the output gradient)")
            grad = decode_tensor(second.tensors[0], max_numel=self.limits.max_numel)
            check_backward_size(hidden, grad, self.limits)
            fn = functools.partial(self._grads, leaves, out, grad, hidden.dtype)
            grads = await self._locked(fn, self.inline_compute_tokens + 1, generation)
            self._count_call("held_backward_calls", start, end, tokens)
            return grads

        try:
            await self._serve_once("train", serve, stream_info, reader, writer)
        finally:
            self._held_tokens -= held_tokens

    async def _serve_once(
        self,
        kind: str,
        serve: Callable[..., Any],
        stream_info: StreamInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Read one request, answer it with `serve`'s tensors (none: `serve` answered) or with an error, close."""
        try:
            request = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes)
            if request is None:
                return
            self._check_serving()
            generation = self.generation
            start, end = parse_span_uid(request.uid, self.limits)
            outputs = await serve(request, start, end, generation)
            if outputs:
                await send_message(make_response(outputs, {}), writer)
        except (ProtocolError, RemoteError) as e:
            self.stats["errors"] += 1
            logger.info(f"{kind} from {_short(stream_info.peer_id)} rejected: {e}")
            await _try_send_error(str(e), writer, reader)
        except TimeoutError:
            logger.info(f"{kind} from {_short(stream_info.peer_id)}: no gradient within the hold timeout")
            await _try_send_error("no output gradient within the hold timeout: the graph was dropped", writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug(f"{kind} from {_short(stream_info.peer_id)}: connection lost")
        except Exception as e:
            self.stats["errors"] += 1
            logger.exception(f"{kind} from {_short(stream_info.peer_id)} failed")
            await _try_send_error(f"internal error: {type(e).__name__}: {e}", writer)
        finally:
            writer.close()

    async def _handle_inference(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Session protocol: an opening request (uid 'start:end', metadata max_length and batch) answered with the
        session's push token, then one request per step (hidden states, metadata position, optional step number
        and push chain) answered with the outputs. Steps come from the client or, pushed, from the previous peer
        of the route (see _handle_push); a step number seen before is dropped, so each step is computed and
        answered once. The session ends when the client closes the stream, on an error, or after idle_timeout."""
        session: PeerSession | None = None
        peer = _short(stream_info.peer_id)
        try:
            opening = await self._receive(reader)
            if opening is None:
                return
            self._check_serving()
            generation = self.generation
            start, end = parse_span_uid(opening.uid, self.limits)
            meta = decode_metadata(opening.metadata)
            max_length = get_int(meta, "max_length", low=1, high=self.limits.max_length)
            batch = get_int(meta, "batch", low=1, high=self.limits.max_batch)
            tensors, scale = self._read_session_trainables(opening, batch, max_length, start, end)
            self.budget.reserve(batch * max_length)
            session = PeerSession(start, end, batch, max_length, self.span.new_cache(), tensors=tensors)
            session.lora_scale = scale
            logger.debug(
                f"session {session.session_id} from {peer}: blocks {start}:{end}, "
                f"batch {batch}, max_length {max_length}"
            )
            token = secrets.token_hex(16)  # a capability: only peers the client names can push into this session
            inbox: asyncio.Queue = asyncio.Queue(maxsize=INBOX_SIZE)
            self._inboxes[token] = inbox
            reading = asyncio.create_task(self._read_client(reader, inbox))
            try:
                await send_message(make_response([], {"session_id": session.session_id, "push_token": token}), writer)
                await self._serve_steps(session, inbox, writer, generation)
            finally:
                del self._inboxes[token]
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
        except (ProtocolError, RemoteError) as e:
            self.stats["errors"] += 1
            logger.info(f"inference session from {peer} ended with an error: {e}")
            await _try_send_error(str(e), writer, reader)
        except TimeoutError:
            logger.info(f"inference session from {peer} closed after {self.idle_timeout:.0f} s idle")
            await _try_send_error(f"session closed after {self.idle_timeout:.0f} s without requests", writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug(f"inference session from {peer}: connection lost")
        except Exception as e:
            self.stats["errors"] += 1
            logger.exception(f"inference session from {peer} failed")
            await _try_send_error(f"internal error: {type(e).__name__}: {e}", writer)
        finally:
            if session is not None:
                self.budget.release(session.reserved_tokens)
                session.cache = None  # free the KV cache now, not when the handler's frame is collected
            writer.close()

    async def _read_client(self, reader: asyncio.StreamReader, inbox: asyncio.Queue) -> None:
        """Move the client's requests into the session's inbox; None at the end of the stream, or the error."""
        while True:
            try:
                request = await receive_message(
                    reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes
                )
            except Exception as e:
                await inbox.put(e)
                return
            await inbox.put(request)
            if request is None:
                return

    async def _serve_steps(
        self, session: PeerSession, inbox: asyncio.Queue, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        last_step = -1
        while True:
            async with asyncio.timeout(self.idle_timeout):  # unlike wait_for, no extra task per step
                request = await inbox.get()
            if request is None:
                return
            if isinstance(request, BaseException):
                raise request
            meta = decode_metadata(request.metadata)
            step = get_step(meta)
            if step is not None:
                if step <= last_step:
                    continue  # the second copy of a step (pushed and also sent by the client): done already
                last_step = step
            hidden = self._read_hidden(request, batch=session.batch)
            position = get_int(meta, "position", low=0, high=session.max_length)
            chain = get_push_chain(meta)
            if (prompts := session.tensors.get(PROMPTS)) is not None:
                try:
                    check_prompt_positions(prompts.shape[-2], position, hidden.shape[1])
                except ValueError as e:
                    raise ProtocolError(str(e)) from None
            session.prepare_step(position, hidden.shape[1])
            began = time.perf_counter()
            output = await self._compute(hidden, session, session.start, session.end, generation)
            compute_s = time.perf_counter() - began
            self.stats["inference_steps"] += 1
            self._count_tokens(session.start, session.end, hidden.shape[0] * hidden.shape[1])
            encoded = encode_tensor(output)  # once, for the next peer and for the client
            if chain:
                await self._push(chain, encoded, position, step)
            # The compute time lets the client tell network latency from compute when it picks routes.
            reply = {"position": session.position, "compute_s": compute_s, "step": step}
            await send_message(runtime_pb2.ExpertResponse(tensors=[encoded], metadata=encode_metadata(reply)), writer)

    # ---- peer-to-peer push ----

    async def _push(self, chain: list[tuple[str, str]], output: runtime_pb2.Tensor, position: int, step) -> None:
        """Send a step's output into the next peer's session. Best effort: if it does not arrive, the client sends
        the same step itself after a short grace time."""
        peer_text, token = chain[0]
        try:
            peer_id = PeerID.from_base58(peer_text)
        except Exception:
            raise ProtocolError(f"push chain names an invalid peer ID {peer_text[:64]!r}") from None
        meta = {"position": position, "step": step, "push": [list(hop) for hop in chain[1:]]}
        request = runtime_pb2.ExpertRequest(uid=token, tensors=[output], metadata=encode_metadata(meta))
        if peer_id in self._push_streams:
            await self._send_push(peer_id, request)
        else:  # opening a stream takes round trips: not on the way of this step's answer to the client
            task = asyncio.create_task(self._send_push(peer_id, request))
            self._push_tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._push_tasks.discard)

    async def _send_push(self, peer_id: PeerID, request: runtime_pb2.ExpertRequest) -> None:
        try:
            if peer_id not in self._push_streams:
                _, _, writer = await asyncio.wait_for(
                    self._p2p.call_binary_stream_handler(peer_id, PUSH_HANDLER), PUSH_CONNECT_TIMEOUT
                )
                if peer_id in self._push_streams:  # another session opened one meanwhile
                    writer.close()
                else:
                    self._push_streams[peer_id] = (writer, asyncio.Lock())
            writer, lock = self._push_streams[peer_id]
            async with lock:  # one frame at a time on a stream shared by sessions
                await send_message(request, writer)
            self.stats["pushes"] += 1
        except Exception as e:
            logger.debug(f"push to {_short(peer_id)} failed: {e!r}")
            stale = self._push_streams.pop(peer_id, None)
            if stale is not None:
                stale[0].close()

    async def _handle_push(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Steps pushed by the previous peer of clients' routes, each addressed to a session by its push token.
        They are checked like the client's own requests, in the session; unknown tokens are dropped."""
        try:
            while True:
                request = await receive_message(
                    reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes
                )
                if request is None:
                    return
                inbox = self._inboxes.get(request.uid)
                if inbox is None:
                    continue  # that session ended (or never existed)
                try:
                    inbox.put_nowait(request)
                except asyncio.QueueFull:
                    logger.debug("a session's inbox is full: dropped a pushed step (the client resends it)")
        except Exception as e:
            logger.debug(f"push stream from {_short(stream_info.peer_id)} ended: {e!r}")
        finally:
            writer.close()

    async def _receive(self, reader: asyncio.StreamReader) -> runtime_pb2.ExpertRequest | None:
        async with asyncio.timeout(self.idle_timeout):  # unlike wait_for, no extra task per step
            return await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes)


def _short(peer_id: PeerID) -> str:
    text = peer_id.to_base58()
    return "..." + text[-6:]


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
