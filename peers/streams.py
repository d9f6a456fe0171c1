"""What every client stream of the peer shares, whatever its RPC: the stream counted against its client's quotas
(peers.quotas) and given back however it ends, requests read with their bytes charged before the payload and a
timeout per frame, work cancelled when the client leaves, and one ladder that answers errors with a frame naming
them. The handlers (peers.handlers) keep only their exchanges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from peers.push import short_id
from peers.quotas import MESSAGE_COPIES, ClientLedger, Holding, Resource
from peers.wire import ProtocolError, RemoteError, receive_message, send_error

logger = logging.getLogger(__name__)
ERROR_DRAIN_SECONDS = 2.0  # after an error, how long to read (and drop) what the client is still sending


class ClientStreams:
    """Client streams of one peer: their quotas (`ledger`), per-frame timeout, size limit and error counts."""

    def __init__(
        self, ledger: ClientLedger, stats: dict[str, int], frame_timeout: float, max_message_bytes: Callable[[], int]
    ):
        self.ledger, self.stats, self.frame_timeout = ledger, stats, frame_timeout
        self.max_message_bytes = max_message_bytes  # a callable: the limit changes when the peer moves

    async def receive(self, reader: asyncio.StreamReader, holding: Holding) -> runtime_pb2.ExpertRequest | None:
        """The stream's next request, its bytes (MESSAGE_COPIES x the frame's length) charged to the client before
        the payload is read; a frame that stalls for frame_timeout ends the stream."""
        return await receive_message(
            reader,
            runtime_pb2.ExpertRequest,
            max_bytes=self.max_message_bytes(),
            frame_timeout=self.frame_timeout,
            on_length=lambda length: holding.take(Resource.REQUEST_BYTES, MESSAGE_COPIES * length),
        )

    async def first_request(self, reader: asyncio.StreamReader, holding: Holding) -> runtime_pb2.ExpertRequest:
        """The stream's first request; ConnectionError if none came. It must arrive within frame_timeout of the
        stream's opening: an idle stream costs a file descriptor.

        The stream is counted against its client's stream quota here, in the handler's body, so that a refusal is
        answered like any other error (raised before client_stream's yield, it would leave no body to skip)."""
        holding.take(Resource.STREAMS, 1)
        async with asyncio.timeout(self.frame_timeout):
            request = await self.receive(reader, holding)
        if request is None:
            raise ConnectionError("the stream ended before a request")
        return request

    @contextlib.asynccontextmanager
    async def client_stream(
        self,
        kind: str,
        info: StreamInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        replies: ReplyChannel | None = None,
    ) -> AsyncIterator[Holding]:
        """A client's stream: errors answered (`answering_errors`); what the stream took for its client (the
        Holding) is given back when it ends, however it ends."""
        holding = Holding(self.ledger, info.peer_id.to_base58())
        try:
            async with self.answering_errors(kind, info, reader, writer, replies):
                yield holding  # the stream itself is counted by first_request, inside the handler's body
        finally:
            holding.close()

    @contextlib.asynccontextmanager
    async def answering_errors(
        self,
        kind: str,
        info: StreamInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        replies: ReplyChannel | None = None,
    ) -> AsyncIterator[None]:
        """Answer whatever goes wrong while serving a stream with an error frame naming it (where the replies go:
        `replies`' connection if given, else the stream); close the stream and that connection."""
        peer = short_id(info.peer_id)
        target = replies or ReplyChannel(writer)
        try:
            yield
        except (ProtocolError, RemoteError) as e:
            self.stats["errors"] += 1
            logger.info(f"{kind} from {peer} refused: {e}")
            # drain what the client still sends (only on the stream: a direct connection's client reads at once)
            await try_send_error(str(e), target.writer, reader if target.writer is writer else None)
        except TimeoutError:
            logger.info(f"{kind} from {peer}: nothing arrived within its timeout")
            await try_send_error(f"{kind} closed: nothing arrived within its timeout", target.writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            logger.debug(f"{kind} from {peer}: connection lost")
        except Exception as e:
            self.stats["errors"] += 1
            self.stats["internal_errors"] += 1
            logger.exception(f"{kind} from {peer} failed")
            await try_send_error(f"internal error: {type(e).__name__}: {e}", target.writer)
        finally:
            target.close_direct()
            writer.close()


class ReplyChannel:
    """Where a stream's replies and its error go: the stream, or the direct connection once the client attached
    one (peers.direct; closed with the stream)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._direct: asyncio.StreamWriter | None = None

    def direct(self, writer: asyncio.StreamWriter) -> None:
        self.writer = self._direct = writer

    def close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()


async def unless_client_leaves(reader: asyncio.StreamReader, work: Any) -> Any:
    """Await `work` (a computation for a client that sends nothing more until it has the answer); if the client
    closes its stream meanwhile, `work` is cancelled: its queued computations are dropped, not computed for
    nobody (a slice already running finishes)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not watch.done():
            watch.cancel()  # awaited: the reader takes one waiter at a time, and the stream may go on
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.done() and not task.cancelled():
        return task.result()
    if watch.done() and not watch.cancelled() and watch.exception() is None and watch.result():
        raise ProtocolError("the client sent data before the answer to its request")
    raise ConnectionError("the client closed the stream before its answer")


def wire_bytes(request: runtime_pb2.ExpertRequest, first: int) -> int:
    """Bytes of the request's tensors from index `first` on (its adapters), as sent: known before decoding."""
    return sum(len(tensor.buffer) for tensor in request.tensors[first:])


async def try_send_error(text: str, writer: asyncio.StreamWriter, reader: asyncio.StreamReader | None = None) -> None:
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
