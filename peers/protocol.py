"""The wire protocol between clients and peers, shared by both sides.

Messages are hivemind's ``ExpertRequest`` / ``ExpertResponse`` protobufs (tensors serialized by hivemind, metadata
as msgpack) framed the way hivemind frames protobuf streams, but read by :func:`receive_message`, which refuses a
frame larger than the receiver's byte limit *before* reading it. Everything taken off the network is checked by
explicit code here or in ``peers.validation`` and rejected with a typed error.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

PROTOCOL_VERSION = 1
INFERENCE_HANDLER = "blockswarm.v1.inference"
FORWARD_HANDLER = "blockswarm.v1.forward"
BACKWARD_HANDLER = "blockswarm.v1.backward"  # stateless: recomputes the span's forward with autograd
TRAIN_HANDLER = "blockswarm.v1.train"  # a forward and its backward on one stream, the graph held in between
INFO_HANDLER = "blockswarm.v1.info"
PUSH_HANDLER = "blockswarm.v1.push"  # peer-to-peer: a step's output pushed straight into the next peer's session
MAX_PUSH_HOPS = 256  # longest chain of next peers one step may name
_TOKEN_CHARS = frozenset("0123456789abcdef")
PUSH_TOKEN_LENGTH = 32

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_HEADER_LEN = P2P.HEADER_LEN
MAX_ERROR_CHARS = 2000  # of an error message from the other side shown in our exceptions


class ProtocolError(ValueError):
    """A request or response that breaks the protocol (bad shape, dtype, size, metadata...)."""


class RemoteError(RuntimeError):
    """The other side reported an error."""


class MessageTooLargeError(ProtocolError):
    pass


def encode_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # hivemind's default (legacy) mode sends bfloat16 as float32 buffers, which decode_tensor rightly refuses
        # (and which doubles the bytes): send the 2-byte data itself, as hivemind's non-legacy mode does.
        return runtime_pb2.Tensor(
            compression=runtime_pb2.CompressionType.NONE,
            buffer=tensor.contiguous().view(torch.int16).numpy().tobytes(),
            size=tensor.shape,
            dtype="bfloat16",
        )
    return serialize_torch_tensor(tensor)


def decode_tensor(proto: runtime_pb2.Tensor, *, max_numel: int) -> torch.Tensor:
    """Deserialize a tensor after checking dtype, compression, shape and buffer size explicitly."""
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise ProtocolError("compressed tensors are not accepted")
    if proto.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"tensor dtype {proto.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    if proto.chunks not in (0, 1):
        raise ProtocolError("chunked tensors are not accepted")
    shape = list(proto.size)
    if len(shape) == 0 or len(shape) > 8:
        raise ProtocolError(f"tensor must have 1-8 dimensions, got {len(shape)}")
    numel = math.prod(shape)
    if numel > max_numel:
        raise ProtocolError(f"tensor of {numel} elements exceeds the limit of {max_numel}")
    if len(proto.buffer) != numel * _ITEMSIZE[proto.dtype]:
        raise ProtocolError(
            f"tensor buffer holds {len(proto.buffer)} bytes, but shape {shape} of {proto.dtype} needs "
            f"{numel * _ITEMSIZE[proto.dtype]}"
        )
    return deserialize_torch_tensor(proto).reshape(shape)


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def decode_metadata(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"metadata is not valid msgpack: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError("metadata must be a map")
    return value


def get_int(meta: dict[str, Any], key: str, *, low: int, high: int, default: int | None = None) -> int:
    """Read an integer field from metadata, checking its type and range."""
    value = meta.get(key, default)
    if value is None:
        raise ProtocolError(f"metadata field {key!r} is required")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"metadata field {key!r} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"metadata field {key!r}={value} is outside [{low}, {high}]")
    return value


def get_step(meta: dict[str, Any]) -> int | None:
    """The step number a client gives its requests so that a peer can drop a second copy of one (pushed by the
    previous peer and also sent by the client); None for requests without one."""
    if meta.get("step") is None:
        return None
    return get_int(meta, "step", low=0, high=2**62)


def check_push_token(token: Any) -> str:
    if not isinstance(token, str) or len(token) != PUSH_TOKEN_LENGTH or not _TOKEN_CHARS.issuperset(token):
        raise ProtocolError(f"a push token must be {PUSH_TOKEN_LENGTH} lowercase hex characters")
    return token


def get_push_chain(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """The peers (base58 peer ID, push token) that this step's output goes to next, in order."""
    chain = meta.get("push", [])
    if not isinstance(chain, list) or len(chain) > MAX_PUSH_HOPS:
        raise ProtocolError(f"metadata field 'push' must be a list of at most {MAX_PUSH_HOPS} [peer, token] pairs")
    result = []
    for hop in chain:
        if not (isinstance(hop, list) and len(hop) == 2 and isinstance(hop[0], str) and 0 < len(hop[0]) <= 128):
            raise ProtocolError("each 'push' hop must be [peer ID, push token]")
        result.append((hop[0], check_push_token(hop[1])))
    return result


def make_request(tensors: list[torch.Tensor], metadata: dict[str, Any], uid: str = "") -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        uid=uid, tensors=[encode_tensor(t) for t in tensors], metadata=encode_metadata(metadata)
    )


def make_response(tensors: list[torch.Tensor], metadata: dict[str, Any]) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=[encode_tensor(t) for t in tensors], metadata=encode_metadata(metadata))


async def send_message(message, writer: asyncio.StreamWriter) -> None:
    await P2P.send_protobuf(message, writer)


async def send_error(text: str, writer: asyncio.StreamWriter) -> None:
    await P2P.send_protobuf(RPCError(message=text), writer)


async def receive_message(reader: asyncio.StreamReader, proto_type: type, *, max_bytes: int):
    """Read one frame; None at a clean end of stream. Raises RemoteError for an error frame."""
    try:
        marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise ProtocolError("invalid frame marker")
    length = int.from_bytes(await reader.readexactly(_HEADER_LEN), P2P.BYTEORDER)
    if length > max_bytes:
        raise MessageTooLargeError(f"message of {length} bytes exceeds the limit of {max_bytes} bytes")
    payload = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:
        raise RemoteError(RPCError.FromString(payload).message[:MAX_ERROR_CHARS])
    try:
        message = proto_type.FromString(payload)
    except Exception as e:
        raise ProtocolError(f"message is not a valid {proto_type.__name__}: {e}") from None
    return message
