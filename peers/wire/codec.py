"""Values inside a message: tensors (hivemind's serialization, decoded only after explicit checks) and metadata
(msgpack), with readers that check each field's type and range and name the field when they refuse it."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import torch
from hivemind.proto import runtime_pb2

from blocks.dtypes import DTYPES
from peers.wire.framing import ProtocolError

WIRE_DTYPES: dict[str, torch.dtype] = DTYPES  # hidden states travel in any dtype a peer may compute in
_ITEMSIZE = {name: torch.finfo(dtype).bits // 8 for name, dtype in WIRE_DTYPES.items()}
_DTYPE_NAME = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_TOKEN_CHARS = frozenset("0123456789abcdef")
# Decoded through numpy where numpy has the dtype: fewer and cheaper calls than torch.frombuffer, which matters on a
# peer's step path, where the layers computed in between have flushed this code from the CPU caches.
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
_NUMPY_TORCH_DTYPES = frozenset(WIRE_DTYPES[name] for name in _NUMPY_DTYPES)
_LARGEST = {dtype: torch.finfo(dtype).max for dtype in WIRE_DTYPES.values()}  # torch.finfo costs a call each time


def encode_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """The tensor's bytes as they are in memory (one copy, into the message), uncompressed.

    Written directly rather than through hivemind's serializer, which is several times slower per call (it goes
    through its compression registry) and sends bfloat16 as float32 buffers in its default mode."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not (tensor.is_cpu and tensor.is_contiguous()):
        tensor = tensor.cpu().contiguous()
    if tensor.dtype in _NUMPY_TORCH_DTYPES:  # through numpy directly: two calls instead of five (see _NUMPY_DTYPES)
        buffer = tensor.numpy().tobytes()
    else:
        buffer = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=buffer,
        size=list(tensor.shape),  # a list: protobuf reads a torch.Size several times slower
        # a dtype the protocol does not carry is still named, so that the receiver refuses it by name
        dtype=_DTYPE_NAME.get(tensor.dtype) or str(tensor.dtype).removeprefix("torch."),
    )


def decode_tensor(proto: runtime_pb2.Tensor, *, max_numel: int) -> torch.Tensor:
    """Rebuild a tensor after checking dtype, compression, shape and buffer size explicitly (a writable copy)."""
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
    buffer = proto.buffer
    if len(buffer) != numel * _ITEMSIZE[proto.dtype]:
        raise ProtocolError(
            f"tensor buffer holds {len(buffer)} bytes, but shape {shape} of {proto.dtype} needs "
            f"{numel * _ITEMSIZE[proto.dtype]}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=WIRE_DTYPES[proto.dtype])
    numpy_dtype = _NUMPY_DTYPES.get(proto.dtype)
    if numpy_dtype is not None:
        return torch.from_numpy(np.frombuffer(buffer, dtype=numpy_dtype).reshape(shape).copy())
    return torch.frombuffer(bytearray(buffer), dtype=WIRE_DTYPES[proto.dtype]).reshape(shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity (numpy's check where it can: a fifth of torch's per-call cost on small tensors)."""
    if tensor.dtype in (torch.float32, torch.float16) and tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def within(tensor: torch.Tensor, bound: float) -> bool:
    """Every value in [-bound, bound]; False for NaN and infinities too (min/max propagate NaN), in one pass each
    of min and max, no temporary copy."""
    largest = _LARGEST.get(tensor.dtype)
    bound = min(bound, torch.finfo(tensor.dtype).max if largest is None else largest)  # beyond it: compares to inf
    if tensor.dtype in _NUMPY_TORCH_DTYPES and tensor.device.type == "cpu":
        array = tensor.detach().numpy()
        return bool(array.max() <= bound) and bool(array.min() >= -bound)
    low, high = torch.aminmax(tensor.detach())
    return bool(high <= bound) and bool(low >= -bound)


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


def get_float(meta: dict[str, Any], key: str, *, low: float, high: float, default: float | None = None) -> float:
    value = meta.get(key, default)
    if value is None:
        raise ProtocolError(f"metadata field {key!r} is required")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"metadata field {key!r} must be a finite number")
    if not low <= value <= high:
        raise ProtocolError(f"metadata field {key!r}={value} is outside [{low}, {high}]")
    return float(value)


def get_bool(meta: dict[str, Any], key: str, *, default: bool | None = None) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"metadata field {key!r} must be true or false")
    return value


def get_str(meta: dict[str, Any], key: str, *, max_chars: int, default: str | None = None) -> str:
    value = meta.get(key, default)
    if not isinstance(value, str) or len(value) > max_chars:
        raise ProtocolError(f"metadata field {key!r} must be a string of at most {max_chars} characters")
    return value


def get_hex_token(meta: dict[str, Any], key: str, *, length: int) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or len(value) != length or not _TOKEN_CHARS.issuperset(value):
        raise ProtocolError(f"metadata field {key!r} must be {length} lowercase hex characters")
    return value
