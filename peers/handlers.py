"""The peer's RPC handlers: a bidirectional inference stream per session, a whole-sequence forward, an info call.

One computation runs at a time. Small steps (decoding) run right on the event loop, where a thread hand-off would
cost more than the step; larger ones run on a dedicated compute thread so the loop keeps reading requests and
answering info calls meanwhile. Each session owns its cache; nothing is shared between sessions but the weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from blocks.span import BlockSpan
from peers.protocol import (
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_VERSION,
    PUSH_HANDLER,
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
from peers.validation import Limits, check_forward_size, check_hidden, parse_span_uid

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
            "errors": 0,
            "tokens_processed": 0,
            "compute_seconds": 0.0,
            "pushes": 0,
        }
        self._p2p: P2P | None = None
        self.generation = 0  # bumped when the peer moves to other blocks: sessions opened before must end
        self._inboxes: dict[str, asyncio.Queue] = {}  # push token -> the session's queue of requests
        self._push_streams: dict[PeerID, tuple[asyncio.StreamWriter, asyncio.Lock]] = {}

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
        await p2p.add_protobuf_handler(INFO_HANDLER, self._handle_info, runtime_pb2.ExpertUID)
        await p2p.add_binary_stream_handler(PUSH_HANDLER, self._handle_push)

    async def stop(self) -> None:
        for writer, _ in self._push_streams.values():
            writer.close()
        self._push_streams.clear()
        if self._p2p is not None:
            for name in (INFERENCE_HANDLER, FORWARD_HANDLER, PUSH_HANDLER):
                await self._p2p.remove_binary_stream_handler(name)
            await self._p2p.remove_protobuf_handler(INFO_HANDLER)
            await self._p2p.shutdown()  # a replica: closes our connection to the daemon, not the daemon
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ---- compute (runs on the compute thread) ----

    def _run(self, hidden: torch.Tensor, session: PeerSession | None, start: int, end: int) -> torch.Tensor:
        began = time.perf_counter()
        try:
            return self._run_blocks(hidden, session, start, end)
        finally:
            self.stats["compute_seconds"] += time.perf_counter() - began

    def _run_blocks(self, hidden: torch.Tensor, session: PeerSession | None, start: int, end: int):
        wire_dtype = hidden.dtype
        with torch.inference_mode():
            x = hidden.to(self.device, self.span.dtype)
            if session is None:
                out = self.span(x, None, 0, start, end)
            else:
                out = self.span(x, session.cache, session.position, start, end)
                session.position += hidden.shape[1]
            return out.to("cpu", wire_dtype)

    async def _compute(
        self, hidden: torch.Tensor, session: PeerSession | None, start: int, end: int, generation: int
    ) -> torch.Tensor:
        async with self._compute_lock:  # one computation at a time, wherever it runs
            self._check_serving(generation)  # the blocks may have changed while this request waited
            if hidden.shape[0] * hidden.shape[1] <= self.inline_compute_tokens:
                # A decode step takes about a millisecond: handing it to another thread and back costs two
                # thread wake-ups, a large share of a step on a busy machine, for no gain.
                return self._run(hidden, session, start, end)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._run, hidden, session, start, end)

    # ---- handlers ----

    async def _handle_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        info = dict(self.static_info)
        info.update(
            protocol_version=PROTOCOL_VERSION,
            cache_tokens_left=self.budget.tokens_left,
            sessions=self.budget.sessions,
            stats=dict(self.stats),
        )
        return runtime_pb2.ExpertInfo(serialized_info=encode_metadata(info))

    def _read_hidden(self, request: runtime_pb2.ExpertRequest, batch: int | None = None) -> torch.Tensor:
        if len(request.tensors) != 1:
            raise ProtocolError(f"expected exactly 1 tensor (hidden states), got {len(request.tensors)}")
        hidden = decode_tensor(request.tensors[0], max_numel=self.limits.max_numel)
        return check_hidden(hidden, self.limits, batch=batch)

    async def _handle_forward(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One request (span uid + hidden states) -> one response (output hidden states)."""
        try:
            request = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=self.limits.max_message_bytes)
            if request is None:
                return
            self._check_serving()
            generation = self.generation
            start, end = parse_span_uid(request.uid, self.limits)
            hidden = self._read_hidden(request)
            check_forward_size(hidden, self.limits)
            output = await self._compute(hidden, None, start, end, generation)
            self.stats["forward_calls"] += 1
            self.stats["tokens_processed"] += hidden.shape[0] * hidden.shape[1]
            await send_message(make_response([output], {}), writer)
        except (ProtocolError, RemoteError) as e:
            self.stats["errors"] += 1
            logger.info(f"forward from {_short(stream_info.peer_id)} rejected: {e}")
            await _try_send_error(str(e), writer, reader)
        except Exception as e:
            self.stats["errors"] += 1
            logger.exception(f"forward from {_short(stream_info.peer_id)} failed")
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
            self.budget.reserve(batch * max_length)
            session = PeerSession(start, end, batch, max_length, self.span.new_cache())
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
            session.prepare_step(position, hidden.shape[1])
            began = time.perf_counter()
            output = await self._compute(hidden, session, session.start, session.end, generation)
            compute_s = time.perf_counter() - began
            self.stats["inference_steps"] += 1
            self.stats["tokens_processed"] += hidden.shape[0] * hidden.shape[1]
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
            asyncio.create_task(self._send_push(peer_id, request))

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
