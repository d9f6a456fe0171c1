"""The federated exchange's wire messages, used by both sides: FetchRequest (ask a client of the run for its
noisy update of a round, or its current adapter) and VectorReply (a float32 vector in parts), on a P2P stream
handler named by `handler_name`."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from peers.wire.codec import decode_metadata, decode_tensor, encode_metadata, encode_tensor, get_int
from peers.wire.framing import ProtocolError
from swarm.federated.errors import RejectedUpdate

PROTOCOL_VERSION = 1
STATE_ROUND = -1  # a FetchRequest for the current adapter instead of a round's update


class _Key:
    VERSION = "version"
    ROUND = "round"
    NUMEL = "numel"
    PARTS = "parts"


@dataclass(frozen=True)
class FetchRequest:
    """Ask a client of the run for its noisy update of `round` (or, with STATE_ROUND, its current adapter)."""

    round: int

    def encode(self) -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(
            metadata=encode_metadata({_Key.VERSION: PROTOCOL_VERSION, _Key.ROUND: self.round})
        )

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest) -> FetchRequest:
        meta = decode_metadata(proto.metadata)
        get_int(meta, _Key.VERSION, low=PROTOCOL_VERSION, high=PROTOCOL_VERSION)
        return cls(get_int(meta, _Key.ROUND, low=STATE_ROUND, high=2**40))


@dataclass(frozen=True)
class VectorReply:
    """A float32 vector with the round it belongs to, sent as parts of at most `part_numel` values."""

    round: int
    vector: torch.Tensor

    def encode(self, part_numel: int) -> list[runtime_pb2.ExpertResponse]:
        parts = list(self.vector.split(part_numel)) or [self.vector]
        head = {_Key.ROUND: self.round, _Key.NUMEL: self.vector.numel(), _Key.PARTS: len(parts)}
        return [
            runtime_pb2.ExpertResponse(tensors=[encode_tensor(part)], metadata=encode_metadata(head) if i == 0 else b"")
            for i, part in enumerate(parts)
        ]

    @classmethod
    async def decode(
        cls, stream: AsyncIterator[runtime_pb2.ExpertResponse], *, numel: int, part_numel: int
    ) -> VectorReply:
        """Read the parts, checking the round field, the announced and actual sizes against `numel`."""
        parts: list[torch.Tensor] = []
        head: dict[str, Any] | None = None
        expected_parts = 0
        async for message in stream:
            if head is None:
                head = decode_metadata(message.metadata)
                if get_int(head, _Key.NUMEL, low=0, high=2**40) != numel:
                    raise RejectedUpdate(f"{head[_Key.NUMEL]} values announced, the adapter has {numel}")
                expected_parts = get_int(head, _Key.PARTS, low=1, high=max(1, math.ceil(numel / part_numel)))
            if len(message.tensors) != 1 or len(parts) >= expected_parts:
                raise ProtocolError("unexpected message in a vector reply")
            parts.append(decode_tensor(message.tensors[0], max_numel=numel))
        if head is None or len(parts) != expected_parts:
            raise ProtocolError(f"vector reply ended after {len(parts)} of {expected_parts} parts")
        if any(p.dtype != torch.float32 for p in parts):
            raise RejectedUpdate(f"parts of dtype {sorted({str(p.dtype) for p in parts})}, expected float32")
        vector = torch.cat([p.reshape(-1) for p in parts])
        return cls(get_int(head, _Key.ROUND, low=STATE_ROUND, high=2**40), vector)


def handler_name(run: str) -> str:
    """The P2P handler of run `run`'s exchange (one per run, so runs on one P2P do not mix)."""
    return f"blockswarm.fed.v{PROTOCOL_VERSION}.{run}"
