"""A peer answers malformed requests with clear errors and keeps serving everyone else."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from conftest import start_swarm, wait_until
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from blocks.adapters import Adapters
from peers.wire import (
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PUSH_HANDLER,
    Backward,
    Forward,
    PeerInfo,
    Step,
    encode_tensor,
    receive_message,
)
from peers.wire.codec import encode_metadata
from swarm import AutoDistributedModelForCausalLM, PeerError
from swarm.transport import InferenceStream, call_forward

HIDDEN = 64
MAX_LENGTH = 48
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def guarded(llama_ckpt):
    """One peer serving blocks 0:4 with small limits, and a client connected to it."""
    swarm = start_swarm(
        llama_ckpt,
        peers=1,
        spans=[(0, 4)],
        extra_args=[
            "--max-length",
            str(MAX_LENGTH),
            "--max-batch",
            "4",
            "--max-message-bytes",
            str(MAX_BYTES),
            "--cache-tokens",
            "200",
            "--max-sessions",
            "3",
        ],
    )
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=swarm.initial_peers)
    yield swarm, model
    model.shutdown()
    swarm.stop_checked()


def _ctx(guarded):
    swarm, model = guarded
    return model.model.sequence, PeerID.from_base58(swarm.peers[0].info["peer_id"])


@dataclass(frozen=True)
class ForwardWithUid(Forward):
    """A forward whose span field says whatever the test says (the typed message can only spell a valid span)."""

    uid: str = "0:4"

    def encode(self) -> runtime_pb2.ExpertRequest:
        request = super().encode()
        request.uid = self.uid
        return request


def forward(guarded, hidden: torch.Tensor, uid: str = "0:4") -> torch.Tensor:
    seq, peer = _ctx(guarded)
    return seq.loop.run(call_forward(seq.p2p, peer, ForwardWithUid(0, 4, hidden, uid=uid), 10**8, timeout=30))


@pytest.mark.parametrize(
    "hidden, uid, message",
    [
        (torch.randn(1, 3, HIDDEN + 1), "0:4", "hidden size must be 64"),
        (torch.randn(3, HIDDEN), "0:4", "must have 3 dimensions"),
        (torch.randn(1, 3, 2, HIDDEN), "0:4", "must have 3 dimensions"),
        (torch.randint(0, 5, (1, 3, HIDDEN)), "0:4", "dtype 'int64'"),
        (torch.randn(1, 3, HIDDEN), "4:8", r"blocks \[4, 8\) are not served here"),
        (torch.randn(1, 3, HIDDEN), "2:1", "not served here"),
        (torch.randn(1, 3, HIDDEN), "zero:four", "span must look like"),
        (torch.full((1, 3, HIDDEN), float("nan")), "0:4", "NaN"),
        (torch.full((1, 3, HIDDEN), float("inf")), "0:4", "infinite"),
        (torch.randn(5, 3, HIDDEN), "0:4", "batch size 5 exceeds this peer's limit of 4"),
        (torch.randn(1, MAX_LENGTH + 1, HIDDEN), "0:4", "exceeds this peer's max length"),
        (torch.randn(2, 200, HIDDEN), "0:4", "exceeds the limit of 65536 bytes"),
    ],
)
def test_bad_forward_requests_get_clear_errors(guarded, hidden, uid, message):
    with pytest.raises(PeerError, match=message):
        forward(guarded, hidden, uid)


def open_stream(guarded, max_length: int = 16, batch: int = 1, uid: str = "0:4") -> InferenceStream:
    seq, peer = _ctx(guarded)
    start, end = (int(b) for b in uid.split(":"))
    stream = InferenceStream(seq.p2p, peer, start, end, 10**8, timeout=30)
    seq.loop.run(stream.open(max_length, batch, connect_timeout=30, adapters=Adapters()))
    return stream


def step(guarded, stream: InferenceStream, hidden: torch.Tensor, position: int) -> torch.Tensor:
    return _ctx(guarded)[0].loop.run(stream.step(hidden, position))


def close(guarded, stream: InferenceStream) -> None:
    _ctx(guarded)[0].loop.run(stream.close())


@pytest.mark.parametrize(
    "max_length, batch, uid, message",
    [
        (MAX_LENGTH + 1, 1, "0:4", "limit exceeded: max_length=48, requested 49"),
        (0, 1, "0:4", "'max_length'=0 is outside"),
        (8, 0, "0:4", "'batch'=0 is outside"),
        (40, 4, "0:4", "needs 160 cache tokens"),  # fits max_length and batch, but not... see below
        (8, 1, "3:9", "not served here"),
    ],
)
def test_bad_session_openings_get_clear_errors(guarded, max_length, batch, uid, message):
    if message.startswith("needs"):
        # 200 cache tokens: hold one session of 2x48=96 tokens, then ask for 160 more
        holder = open_stream(guarded, max_length=48, batch=2)
        try:
            with pytest.raises(PeerError, match="needs 160 cache tokens but only 104 of 200 are free"):
                open_stream(guarded, max_length, batch, uid)
        finally:
            close(guarded, holder)
        return
    with pytest.raises(PeerError, match=message):
        open_stream(guarded, max_length, batch, uid)


def test_bad_steps_end_only_their_own_session(guarded, llama_ckpt, local_model):
    _, model = guarded
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = local_model(llama_ckpt).generate(ids, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=30) as good:
        first = model.generate(ids, max_new_tokens=4, do_sample=False)
        cases = [
            (lambda s: step(guarded, s, torch.randn(1, 2, HIDDEN), 5), "holds only 0 tokens"),
            (lambda s: step(guarded, s, torch.randn(1, 17, HIDDEN), 0), "over its max_length 16"),
            (lambda s: step(guarded, s, torch.randn(2, 1, HIDDEN), 0), "opened with batch size 1, got 2"),
            (lambda s: step(guarded, s, torch.full((1, 1, HIDDEN), float("nan")), 0), "NaN"),
            (lambda s: step(guarded, s, torch.randn(1, 1, HIDDEN + 3), 0), "hidden size must be 64"),
        ]
        for bad_call, message in cases:
            stream = open_stream(guarded)
            try:
                with pytest.raises(PeerError, match=message):
                    bad_call(stream)
                # the session that misbehaved is closed by the peer
                with pytest.raises(PeerError):
                    step(guarded, stream, torch.randn(1, 1, HIDDEN), 0)
            finally:
                close(guarded, stream)
        # the well-behaved session, open all along, continues exactly
        assert good.position == 13
        second = model.generate(None, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, expected[:, :14])
    assert torch.equal(second, expected)


def first_answer(guarded, handler: str, data: bytes) -> str:
    """Send raw bytes to a peer's handler; the error text of its first answer (or "no error")."""
    seq, peer = _ctx(guarded)

    async def exchange() -> str:
        _, reader, writer = await seq.p2p.call_binary_stream_handler(peer, handler)
        try:
            writer.write(data)
            await writer.drain()
            try:
                await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=10**6)
            except Exception as e:
                return str(e)
            return "no error"
        finally:
            writer.close()

    return seq.loop.run(exchange())


def test_oversized_and_garbage_frames_are_refused(guarded):
    # a header announcing 1 GiB is refused before any payload is sent
    assert "exceeds the limit of 65536 bytes" in first_answer(
        guarded, FORWARD_HANDLER, b"\x00" + (2**30).to_bytes(8, "big")
    )
    garbage_marker = b"\x07" + (10).to_bytes(8, "big") + b"x" * 10
    assert "invalid frame marker" in first_answer(guarded, FORWARD_HANDLER, garbage_marker)
    garbage_proto = b"\x00" + (4).to_bytes(8, "big") + b"\xff\xff\xff\xff"
    assert "not a valid ExpertRequest" in first_answer(guarded, FORWARD_HANDLER, garbage_proto)


def test_too_many_sessions_is_refused_and_freed(guarded):
    streams = [open_stream(guarded, max_length=8) for _ in range(3)]
    try:
        with pytest.raises(PeerError, match="limit of 3 sessions"):
            open_stream(guarded, max_length=8)
    finally:
        for s in streams:
            close(guarded, s)
    # closed sessions give their slots and cache back (the peer notices the close asynchronously)
    for _ in range(50):
        reopened = []
        try:
            for _ in range(3):
                reopened.append(open_stream(guarded, max_length=8))
            break
        except PeerError:
            time.sleep(0.1)
        finally:
            for s in reopened:
                close(guarded, s)
    else:
        pytest.fail("the peer did not free the slots of closed sessions within 5 s")


def test_session_metadata_must_be_well_typed(guarded):
    def opening(metadata: dict) -> str:
        request = runtime_pb2.ExpertRequest(uid="0:4", metadata=encode_metadata({"version": 2, **metadata}))
        payload = request.SerializeToString()
        return first_answer(guarded, INFERENCE_HANDLER, b"\x00" + len(payload).to_bytes(8, "big") + payload)

    assert "'max_length' must be an integer, got str" in opening({"max_length": "8", "batch": 1})
    assert "'batch' must be an integer, got bool" in opening({"max_length": 8, "batch": True})
    assert "'batch' is required" in opening({"max_length": 8})


def _push_raw(guarded, data: bytes) -> None:
    """Write raw bytes to the peer's push handler, as a neighbour of a route would, and close the stream."""
    seq, peer = _ctx(guarded)

    async def push() -> None:
        _, _, writer = await seq.p2p.call_binary_stream_handler(peer, PUSH_HANDLER)
        writer.write(data)
        await writer.drain()
        writer.close()

    seq.loop.run(push())


def _frame(request: runtime_pb2.ExpertRequest) -> bytes:
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(8, "big") + payload


def test_bad_pushes_are_dropped_alone(guarded):
    """A neighbour that knows a session's push token and pushes malformed steps does not end that session."""
    stream = open_stream(guarded, max_length=16)
    try:
        token = stream.push_token
        hidden = torch.randn(1, 2, HIDDEN)
        bad = [
            Step(torch.randn(1, 2, HIDDEN + 1), 0, 1).encode(token),  # wrong hidden size
            Step(torch.full((1, 2, HIDDEN), float("nan")), 0, 2).encode(token),
            Step(hidden, 9, 3).encode(token),  # beyond the session's cache
            Step(torch.randn(3, 2, HIDDEN), 0, 4).encode(token),  # another batch size
            runtime_pb2.ExpertRequest(uid=token, metadata=b"\xc1"),  # metadata that is not msgpack
        ]
        before = _stats(guarded)["refused_pushes"]
        for i, request in enumerate(bad, 1):
            _push_raw(guarded, _frame(request))
            wait_until(lambda i=i: _stats(guarded)["refused_pushes"] >= before + i, f"bad push {i} refused")
        # each was dropped alone: the session goes on
        out = step(guarded, stream, hidden, 0)
        assert out.shape == hidden.shape
        assert step(guarded, stream, torch.randn(1, 1, HIDDEN), 2).shape == (1, 1, HIDDEN)
    finally:
        close(guarded, stream)


def test_digits_of_other_scripts_and_corrupt_error_frames_are_clear_errors(guarded):
    # superscripts pass str.isdigit() but not int(): a clear error, not an internal one
    for uid in ("\u00b2:\u00b3", "0:\u2074", "\u0660:\u0664"):
        with pytest.raises(PeerError, match="span must look like"):
            forward(guarded, torch.randn(1, 3, HIDDEN), uid)
    # an error frame whose payload is not an RPCError
    corrupt = b"\x01" + (3).to_bytes(8, "big") + b"\xff\xff\xff"
    assert "not a valid RPCError" in first_answer(guarded, FORWARD_HANDLER, corrupt)


def test_backward_refuses_unnamed_tensors_and_huge_gradients(guarded):
    hidden = torch.randn(1, 3, HIDDEN)

    def backward(request: runtime_pb2.ExpertRequest) -> str:
        return first_answer(guarded, BACKWARD_HANDLER, _frame(request))

    extra = Backward(0, 4, hidden, torch.randn(1, 3, HIDDEN)).encode()
    extra.tensors.append(encode_tensor(torch.randn(4)))
    assert "0 adapter names for 1 adapter tensors" in backward(extra)
    huge = Backward(0, 4, hidden, torch.full((1, 3, HIDDEN), 3e38)).encode()
    assert "output gradients contain values beyond" in backward(huge)
    assert "hidden states contain values beyond" in backward(Backward(0, 4, hidden * 1e20, hidden).encode())
    ok = backward(Backward(0, 4, hidden, torch.randn(1, 3, HIDDEN)).encode())
    assert ok == "no error"
    assert _stats(guarded)["internal_errors"] == 0


def _stats(guarded) -> dict[str, float]:
    seq, peer = _ctx(guarded)
    reply = seq.loop.run(
        seq.p2p.call_protobuf_handler(peer, INFO_HANDLER, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo)
    )
    return PeerInfo.decode(reply).stats
