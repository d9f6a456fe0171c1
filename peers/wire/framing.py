"""Frames on a stream: hivemind's protobuf framing (a marker byte, a length, the payload), read so that a frame
larger than the receiver's byte limit is refused *before* it is read. Errors of the protocol are typed here."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from hivemind.p2p import P2P
from hivemind.proto.p2pd_pb2 import RPCError

_HEADER_LEN = P2P.HEADER_LEN
MAX_ERROR_CHARS = 2000  # of an error message from the other side shown in our exceptions


class ProtocolError(ValueError):
    """A request or response that breaks the protocol (bad shape, dtype, size, field...)."""


class LimitExceeded(ProtocolError):
    """A request over one of the peer's size limits (`setting`, a field of validation.Limits and of PeerConfig):
    an error of the request, which smaller requests would avoid, not of the peer. Its text, which the error frame
    carries, begins in a fixed form (LIMIT_EXCEEDED, the setting, its value, the size requested) that the other
    side reads back with `parse`: the one definition of that form."""

    def __init__(self, setting: str, limit: int, requested: int, detail: str = ""):
        self.setting, self.limit, self.requested = setting, limit, requested
        super().__init__(
            f"{LIMIT_EXCEEDED}: {setting}={limit}, requested {requested}" + (f": {detail}" if detail else "")
        )

    @classmethod
    def parse(cls, text: str) -> LimitExceeded | None:
        """The refusal an error text carries, or None if it is not one."""
        match = _LIMIT_RE.match(text)
        if match is None:
            return None
        setting, limit, requested, detail = match.groups()
        return cls(setting, int(limit), int(requested), detail or "")


LIMIT_EXCEEDED = "limit exceeded"
_LIMIT_RE = re.compile(r"^limit exceeded: ([a-z_]{1,40})=(\d{1,18}), requested (\d{1,18})(?:: (.*))?$", re.DOTALL)


class RemoteError(RuntimeError):
    """The other side reported an error."""

    @property
    def refusal(self) -> LimitExceeded | None:
        """What the error says, if it refused a request over one of the sender's size limits."""
        return LimitExceeded.parse(str(self))


class MessageTooLargeError(ProtocolError):
    pass


def frame(message) -> bytes:
    """One whole frame (marker, length, payload) as hivemind's P2P.send_protobuf writes it, in one buffer: one
    write, one system call per message instead of three (the marker and the length each cost a send otherwise)."""
    marker = P2P.ERROR_MARKER if isinstance(message, RPCError) else P2P.MESSAGE_MARKER
    payload = message.SerializeToString()
    return b"".join((marker, len(payload).to_bytes(_HEADER_LEN, P2P.BYTEORDER), payload))


async def send_message(message, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(message))
    await writer.drain()


async def send_error(text: str, writer: asyncio.StreamWriter) -> None:
    await send_message(RPCError(message=text), writer)


class FrameTimeoutError(ProtocolError):
    """A frame began but did not arrive whole in time (a stalled or deliberately slow sender)."""


async def receive_message(
    reader: asyncio.StreamReader,
    proto_type: type,
    *,
    max_bytes: int,
    frame_timeout: float | None = None,
    on_length: Callable[[int], None] | None = None,
):
    """Read one frame; None at a clean end of stream. Raises RemoteError for an error frame.

    `frame_timeout`: once the frame's first byte arrived, the rest must arrive within this many seconds
    (FrameTimeoutError). `on_length(length)` runs after the header, before the payload is read: it may refuse the
    frame (e.g. no memory budget for it) by raising, so that a frame is never buffered before it is accounted for."""
    try:
        marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise ProtocolError("invalid frame marker")
    try:
        async with asyncio.timeout(frame_timeout):
            length = int.from_bytes(await reader.readexactly(_HEADER_LEN), P2P.BYTEORDER)
            if length > max_bytes:
                raise MessageTooLargeError(f"message of {length} bytes exceeds the limit of {max_bytes} bytes")
            if on_length is not None:
                on_length(length)
            payload = await reader.readexactly(length)
    except TimeoutError:
        raise FrameTimeoutError(f"a frame did not arrive whole within {frame_timeout} s") from None
    if marker == P2P.ERROR_MARKER:
        try:
            text = RPCError.FromString(payload).message
        except Exception:  # protobuf raises DecodeError, and others on some garbage
            raise ProtocolError("an error frame that is not a valid RPCError") from None
        if isinstance(text, bytes):  # a proto2 string field that is not UTF-8 comes back as bytes
            text = text.decode("utf-8", errors="replace")
        raise RemoteError(text[:MAX_ERROR_CHARS])
    try:
        message = proto_type.FromString(payload)
    except Exception as e:
        raise ProtocolError(f"message is not a valid {proto_type.__name__}: {e}") from None
    return message
