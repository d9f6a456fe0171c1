"""Peer-to-peer push: a step's output goes straight into the next peer's session instead of through the client.

Each open session has an inbox, addressed by its push token (a capability: only peers the client names can push
into it). This peer keeps one outgoing stream per next peer, shared by sessions, and reads pushed steps from
previous peers on the push handler. Pushing is best effort: if a pushed step does not arrive, the client sends the
same step itself after a short grace time, and a peer computes each numbered step only once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from peers import trace
from peers.wire import PUSH_HANDLER, ProtocolError, Step, receive_message, send_message

logger = logging.getLogger(__name__)
INBOX_SIZE = 4  # requests queued per session (client's and pushed); further pushes are dropped, the client resends
PUSH_CONNECT_TIMEOUT = 5.0  # seconds to open a push stream to the next peer


@dataclass(frozen=True)
class Pushed:
    """A request pushed into a session by the previous peer of its route (not sent by the session's client): a
    malformed one is dropped alone, so that a neighbour cannot end a client's session."""

    request: runtime_pb2.ExpertRequest


def short_id(peer_id: PeerID) -> str:
    return "..." + peer_id.to_base58()[-6:]


class PushRouter:
    """Inboxes of this peer's sessions and streams to the next peers of their routes."""

    def __init__(self, max_message_bytes: Callable[[], int]):
        self._max_message_bytes = max_message_bytes  # the peer's current limit (it changes when the peer moves)
        self._p2p: P2P | None = None
        self._inboxes: dict[str, asyncio.Queue] = {}  # push token -> the session's queue of requests
        self._streams: dict[PeerID, tuple[asyncio.StreamWriter, asyncio.Lock]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.pushes = 0

    def attach(self, p2p: P2P) -> None:
        self._p2p = p2p

    def open_inbox(self) -> tuple[str, asyncio.Queue]:
        token = secrets.token_hex(16)
        inbox: asyncio.Queue = asyncio.Queue(maxsize=INBOX_SIZE)
        self._inboxes[token] = inbox
        return token, inbox

    def close_inbox(self, token: str) -> None:
        self._inboxes.pop(token, None)

    async def push(self, step: Step, output: runtime_pb2.Tensor) -> None:
        """Send step `step`'s output (already encoded) into the session of the first peer of its push chain."""
        peer_text, token = step.push[0]
        try:
            peer_id = PeerID.from_base58(peer_text)
        except Exception:
            raise ProtocolError(f"push chain names an invalid peer ID {peer_text[:64]!r}") from None
        request = step.encoded_forward(output, token)
        if peer_id in self._streams:
            await self._send(peer_id, request)
        else:  # opening a stream takes round trips: not on the way of this step's answer to the client
            task = asyncio.create_task(self._send(peer_id, request))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _send(self, peer_id: PeerID, request: runtime_pb2.ExpertRequest) -> None:
        try:
            if peer_id not in self._streams:
                _, _, writer = await asyncio.wait_for(
                    self._p2p.call_binary_stream_handler(peer_id, PUSH_HANDLER), PUSH_CONNECT_TIMEOUT
                )
                if peer_id in self._streams:  # another session opened one meanwhile
                    writer.close()
                else:
                    self._streams[peer_id] = (writer, asyncio.Lock())
            writer, lock = self._streams[peer_id]
            async with lock:  # one frame at a time on a stream shared by sessions
                await send_message(request, writer)
            self.pushes += 1
        except Exception as e:
            logger.debug(f"push to {short_id(peer_id)} failed: {e!r}")
            stale = self._streams.pop(peer_id, None)
            if stale is not None:
                stale[0].close()

    async def handle(self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Steps pushed by the previous peer of clients' routes, each addressed to a session by its push token.
        They are checked like the client's own requests, in the session; unknown tokens are dropped."""
        try:
            while True:
                request = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=self._max_message_bytes())
                if request is None:
                    return
                if trace.ENABLED:
                    trace.event("peer", trace.PUSH_ARRIVED)
                inbox = self._inboxes.get(request.uid)
                if inbox is None:
                    continue  # that session ended (or never existed)
                try:
                    inbox.put_nowait(Pushed(request))
                except asyncio.QueueFull:
                    logger.debug("a session's inbox is full: dropped a pushed step (the client resends it)")
        except Exception as e:
            logger.debug(f"push stream from {short_id(stream_info.peer_id)} ended: {e!r}")
        finally:
            writer.close()

    def close(self) -> None:
        for writer, _ in self._streams.values():
            writer.close()
        self._streams.clear()
