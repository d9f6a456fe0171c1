"""The client's side of the wire protocol: a background event loop and calls to peers over hivemind P2P, each
speaking the typed messages of peers.wire.

User code is synchronous (``model.generate``); P2P is asyncio. One daemon thread runs the loop; a whole
generation step across every span of the route is one coroutine there, so each token costs one thread hop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import torch
import uvloop
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from blocks.adapters import Adapters
from peers import trace
from peers.wire import (
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    TRAIN_HANDLER,
    Backward,
    DirectOffer,
    Forward,
    ForwardReply,
    Gradients,
    GradOutput,
    LimitExceeded,
    OpenSession,
    PeerInfo,
    ProtocolError,
    RemoteError,
    SessionOpened,
    Step,
    StepReply,
    receive_message,
    send_message,
)
from swarm.direct import DirectConnectError, connect_direct

T = TypeVar("T")
logger = logging.getLogger(__name__)


class PeerError(RuntimeError):
    """A call to one peer failed (it died, timed out, or answered with an error)."""

    refusal: LimitExceeded | None = None  # the peer refused the request as over this size limit of its own

    def __init__(self, peer_id: PeerID, message: str):
        self.peer_id = peer_id
        super().__init__(f"peer {peer_id}: {message}")


class PeerUnreachableError(PeerError):
    """Not even a stream to the peer could be opened: no route to its ID (e.g. a record of a peer that does not
    exist), the dial failed, or it timed out. The peer is kept out of routes until it answers a probe."""


async def open_stream(
    p2p: P2P, peer_id: PeerID, handler: str, timeout: float
) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """A new stream to `peer_id`'s `handler`; PeerUnreachableError if it cannot be opened within `timeout`."""
    try:
        return await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, handler), timeout)
    except TimeoutError:
        raise PeerUnreachableError(peer_id, "cannot be reached: timed out") from None
    except Exception as e:
        raise PeerUnreachableError(peer_id, f"cannot be reached: {type(e).__name__}: {e}") from e


class LoopThread:
    """An asyncio event loop for the client's network I/O, running in a daemon thread.

    A thread that makes many short calls in a row (generate: one step per token) can borrow the loop: while it is
    borrowed, each of that thread's calls runs the loop itself, in that thread, for the length of the call, which
    saves the thread hop (a wake-up of the loop thread through its self-pipe, then one of the caller) on every
    token. Calls from other threads meanwhile are queued and run during the borrower's next call.
    """

    def __init__(self, name: str = "blockswarm-client"):
        self.name = name
        self.loop = uvloop.new_event_loop()  # libuv: a fraction of asyncio's own cost per message and task switch
        self._borrower: int | None = None
        self._borrow_lock = threading.Lock()
        self._thread = self._start_thread()

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)
        thread.start()
        return thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._borrower == threading.get_ident():
            return self.loop.run_until_complete(coro if timeout is None else asyncio.wait_for(coro, timeout))
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[None]:
        """Run this thread's calls on the loop directly while the block is open (if no other thread borrows it)."""
        if self._borrower == threading.get_ident() or not self._borrow_lock.acquire(blocking=False):
            yield  # nested, or another thread has it: calls take the thread hop
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self._borrower = threading.get_ident()
            try:
                yield
            finally:
                self._borrower = None
                self._thread = self._start_thread()
        finally:
            self._borrow_lock.release()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class InferenceStream:
    """An open inference session with one peer for blocks [start, end) (async; used on the client's loop).

    One long-lived task reads the peer's replies as they come and queues them; a step waits for the next one. So
    a step costs no task of its own, and a reply that comes while nobody waits (a late push) is simply next.

    With `direct`, the session asks for a direct connection (peers.direct, swarm.direct) and, if the peer offers
    one that works, sends its steps there and reads replies from both (errors and the session's end come on the
    stream); otherwise everything stays on the stream.
    """

    def __init__(
        self, p2p: P2P, peer_id: PeerID, start: int, end: int, max_bytes: int, timeout: float, direct: bool = False
    ):
        self.p2p, self.peer_id, self.start, self.end = p2p, peer_id, start, end
        self.max_bytes, self.timeout, self.want_direct = max_bytes, timeout, direct
        self.direct = False  # steps go over an attached direct connection
        self.last_rtt = 0.0  # network part of the last step's round trip (s)
        self.last_elapsed = 0.0  # the whole last step as the client saw it, compute included (s)
        self.push_token: str | None = None  # lets the previous peer of a route push steps into this session
        self._writer: asyncio.StreamWriter | None = None
        self._replies: collections.deque[runtime_pb2.ExpertResponse] = collections.deque()
        self._read_error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._readers: list[asyncio.Task] = []
        self._stream_writer: asyncio.StreamWriter | None = None  # the libp2p stream's, kept open while direct
        self._stream_reader: asyncio.StreamReader | None = None

    @property
    def uid(self) -> str:
        return f"{self.start}:{self.end}"

    async def open(self, max_length: int, batch: int, connect_timeout: float, adapters: Adapters) -> None:
        """Open the session; `adapters` (for these blocks) apply to all its steps."""
        try:
            opened = await open_stream(self.p2p, self.peer_id, INFERENCE_HANDLER, connect_timeout)
            _, reader, self._writer = opened
            self._stream_reader, self._stream_writer = reader, self._writer
            opening = OpenSession(self.start, self.end, max_length, batch, adapters, direct=self.want_direct)
            await send_message(opening.encode(), self._writer)
            self._readers.append(asyncio.create_task(self._read_replies(reader)))
            session = SessionOpened.decode(await self._next_reply(connect_timeout))
            self.push_token = session.push_token
            if self.want_direct and session.direct is not None:
                await self._attach(session.direct, session.session_id, connect_timeout)
        except Exception as e:
            await self.close()
            raise as_peer_error(self.peer_id, e) from e

    async def _attach(self, offer: DirectOffer, session_id: int, timeout: float) -> None:
        try:
            reader, writer = await connect_direct(self.p2p, self.peer_id, offer, session_id, timeout)
        except DirectConnectError as e:
            logger.info(f"no direct connection to {self.peer_id} (the session uses the libp2p stream): {e}")
            return
        self._writer, self.direct = writer, True
        self._readers.append(asyncio.create_task(self._read_replies(reader)))

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Send one step and wait for its answer (no push)."""
        self._check_open()
        try:
            began = time.perf_counter()
            sent = Step(hidden, position)
            await send_message(sent.encode(), self._writer)
            reply = StepReply.decode(await self._next_reply(self.timeout), sent)
            elapsed = self.last_elapsed = time.perf_counter() - began
            # A compute time longer than the round trip is a bad report: it only makes our estimate pessimistic.
            self.last_rtt = elapsed - (reply.compute_s if reply.compute_s <= elapsed else 0.0)
            return reply.hidden
        except BaseException as e:
            raise await self._failed(e) from e

    async def send(self, step: Step) -> None:
        """Send a numbered step whose output the peer also pushes to the peers `step.push` names."""
        self._check_open()
        try:
            await send_message(step.encode(), self._writer)
        except BaseException as e:
            raise await self._failed(e) from e

    async def receive(self, expected: Step, grace: float | None = None) -> torch.Tensor | None:
        """The output of step `expected` (sent by us or pushed by the previous peer). With `grace`, returns None if
        it has not come within `grace` seconds (it stays next in line for a later call)."""
        self._check_open()
        try:
            if grace is not None and not self._replies:
                try:
                    await self._wait(grace)
                except TimeoutError:
                    return None
            return StepReply.decode(await self._next_reply(self.timeout), expected).hidden
        except BaseException as e:
            raise await self._failed(e) from e

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        """A connection's one reader: every reply into the queue, then the end of the stream or the error."""
        try:
            while True:
                response = await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=self.max_bytes)
                if response is None:
                    raise ConnectionError("the peer closed the session")
                if trace.ENABLED:
                    trace.event(trace.place("client", self.start, self.end), trace.REPLY_READ)
                self._replies.append(response)
                self._wake()
        except BaseException as e:
            # Once a direct connection is attached, the peer answers everything there, its errors and the session's
            # end included; the stream's end may come before them (another path) and says nothing new.
            if reader is not self._stream_reader or not self.direct:
                self._read_error = self._read_error or e
                self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        """Until a reply (or the reader's error) is there; TimeoutError after `timeout` seconds."""
        if self._replies or self._read_error is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    async def _next_reply(self, timeout: float) -> runtime_pb2.ExpertResponse:
        await self._wait(timeout)
        if self._replies:
            return self._replies.popleft()
        raise self._read_error

    def _check_open(self) -> None:
        if self._writer is None:
            raise PeerError(self.peer_id, "the session with this peer is closed")

    async def _failed(self, e: BaseException) -> BaseException:
        """After a timeout or a bad answer, a late or half-read reply could be taken for the next step's: this
        stream is never used again."""
        await self.close()
        return as_peer_error(self.peer_id, e) if isinstance(e, Exception) else e

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        self._readers = []
        for writer in {self._writer, self._stream_writer} - {None}:
            writer.close()
        self._writer = self._stream_writer = None


async def call_forward(p2p: P2P, peer_id: PeerID, request: Forward, max_bytes: int, timeout: float) -> torch.Tensor:
    """A whole-sequence forward on one peer."""
    response = await _call_once(p2p, peer_id, FORWARD_HANDLER, request.encode(), max_bytes, timeout)
    return _decoded(peer_id, lambda: ForwardReply.decode(response, request)).hidden


async def call_backward(p2p: P2P, peer_id: PeerID, request: Backward, max_bytes: int, timeout: float) -> Gradients:
    """Gradients w.r.t. the request's input and adapters; the peer recomputes the forward (keeps nothing)."""
    response = await _call_once(p2p, peer_id, BACKWARD_HANDLER, request.encode(), max_bytes, timeout)
    return _decoded(peer_id, lambda: Gradients.decode(response, request.hidden, request.adapters))


def _decoded(peer_id: PeerID, decode: Any) -> Any:
    try:
        return decode()
    except ProtocolError as e:
        raise as_peer_error(peer_id, e) from e


async def _call_once(
    p2p: P2P, peer_id: PeerID, handler: str, request: runtime_pb2.ExpertRequest, max_bytes: int, timeout: float
) -> runtime_pb2.ExpertResponse:
    """One request on a fresh stream -> its answer."""
    writer = None
    try:
        _, reader, writer = await open_stream(p2p, peer_id, handler, timeout)
        try:
            await send_message(request, writer)
        except ConnectionError:
            pass  # the peer may have refused the request mid-way: its error is still waiting to be read
        response = await asyncio.wait_for(
            receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=max_bytes), timeout
        )
        if response is None:
            raise ConnectionError("the peer closed the stream without answering")
        return response
    except Exception as e:
        raise as_peer_error(peer_id, e) from e
    finally:
        if writer is not None:
            writer.close()


class TrainCall:
    """A forward whose backward follows on the same stream, the peer holding the autograd graph in between (see
    the peer's train handler). If the peer would not hold it (`held` is False after `forward`), the stream is
    closed and the stateless backward call is the way to get gradients."""

    def __init__(self, p2p: P2P, peer_id: PeerID, max_bytes: int, timeout: float):
        self.p2p, self.peer_id, self.max_bytes, self.timeout = p2p, peer_id, max_bytes, timeout
        self.held = False
        self._request: Forward | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def forward(self, request: Forward) -> torch.Tensor:
        try:
            self._loop = asyncio.get_running_loop()
            _, self._reader, self._writer = await open_stream(self.p2p, self.peer_id, TRAIN_HANDLER, self.timeout)
            await send_message(request.encode(), self._writer)
            reply = ForwardReply.decode(await self._receive(), request)
        except Exception as e:
            await self.close()
            raise as_peer_error(self.peer_id, e) from e
        self.held, self._request = reply.held, request
        if not self.held:
            await self.close()
        return reply.hidden

    async def backward(self, grad_output: torch.Tensor) -> Gradients:
        """Gradients w.r.t. the forward's input and adapters, from the graph the peer held."""
        if self._writer is None or self._request is None:
            raise PeerError(self.peer_id, "this training call is closed")
        try:
            await send_message(GradOutput(grad_output).encode(), self._writer)
            return Gradients.decode(await self._receive(), self._request.hidden, self._request.adapters)
        except Exception as e:
            raise as_peer_error(self.peer_id, e) from e
        finally:
            await self.close()

    async def _receive(self) -> runtime_pb2.ExpertResponse:
        async with asyncio.timeout(self.timeout):
            response = await receive_message(self._reader, runtime_pb2.ExpertResponse, max_bytes=self.max_bytes)
        if response is None:
            raise ConnectionError("the peer closed the stream without answering")
        return response

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __del__(self) -> None:
        # The autograd graph was dropped without a backward: let the peer free what it holds now, not at its timeout.
        writer, loop = self._writer, self._loop
        if writer is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(writer.close)


async def call_info(p2p: P2P, peer_id: PeerID, timeout: float) -> PeerInfo:
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer_id, INFO_HANDLER, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo),
            timeout,
        )
        return PeerInfo.decode(response)
    except Exception as e:
        raise as_peer_error(peer_id, e) from e


def as_peer_error(peer_id: PeerID, e: BaseException) -> PeerError:
    if isinstance(e, PeerError):
        return e
    if isinstance(e, RemoteError):
        error = PeerError(peer_id, f"refused the request: {e}")
        error.refusal = e.refusal  # judged by the caller, which knows the request (swarm.limits.judge_refusal)
        return error
    if isinstance(e, asyncio.TimeoutError):
        return PeerError(peer_id, "timed out")
    if isinstance(e, ProtocolError):
        return PeerError(peer_id, f"sent an invalid answer: {e}")
    return PeerError(peer_id, f"{type(e).__name__}: {e}")
