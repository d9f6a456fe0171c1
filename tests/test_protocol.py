"""peers.wire / peers.validation / peers.sessions: everything taken off the network is checked explicitly."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import msgpack
import pytest
import torch
from helpers_unit import make_limits, one_torch_thread
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from blocks.span import BlockSpan, serving_config
from peers.sessions import CacheBudget, CacheFullError, PeerSession, TooManySessionsError
from peers.wire import (
    MessageTooLargeError,
    ProtocolError,
    RemoteError,
    Step,
    decode_metadata,
    decode_tensor,
    encode_metadata,
    encode_tensor,
    receive_message,
    send_error,
    send_message,
)
from peers.wire.codec import get_int
from peers.wire.validation import check_forward_size, check_hidden, check_span, parse_span_uid


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


# ---- tensors ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 5)])
def test_tensor_round_trip_is_exact(dtype, shape):
    torch.manual_seed(0)
    tensor = (torch.randn(shape) * 100).to(dtype)
    proto = encode_tensor(tensor)
    assert len(proto.buffer) == tensor.numel() * tensor.element_size()  # no widening on the wire
    out = decode_tensor(proto, max_numel=tensor.numel())
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_tensor_round_trip_non_contiguous():
    tensor = torch.randn(3, 4, 5).to(torch.bfloat16).transpose(0, 2)
    assert torch.equal(decode_tensor(encode_tensor(tensor), max_numel=60), tensor)


@pytest.mark.parametrize("dtype", ["int64", "float64", "int8", "bool", "uint8", "", "complex64"])
def test_decode_rejects_dtype(dtype):
    proto = encode_tensor(torch.randn(2, 4))  # 32 bytes: also a valid int64/float64 buffer size for 4 elements
    proto.dtype = dtype
    with pytest.raises(ProtocolError, match="dtype"):
        decode_tensor(proto, max_numel=100)


def test_decode_rejects_real_int_tensor():
    with pytest.raises(ProtocolError, match="dtype"):
        decode_tensor(serialize_torch_tensor(torch.arange(6)), max_numel=100)


@pytest.mark.parametrize(
    "compression", [runtime_pb2.CompressionType.FLOAT16, runtime_pb2.CompressionType.MEANSTD_16BIT]
)
def test_decode_rejects_compressed(compression):
    proto = serialize_torch_tensor(torch.randn(4, 4), compression)
    with pytest.raises(ProtocolError, match="compressed"):
        decode_tensor(proto, max_numel=100)


def test_decode_rejects_chunked():
    proto = encode_tensor(torch.randn(4))
    proto.chunks = 2
    with pytest.raises(ProtocolError, match="chunked"):
        decode_tensor(proto, max_numel=100)


@pytest.mark.parametrize("delta", [-4, -1, 1, 4, 96])
def test_decode_rejects_buffer_size_mismatch(delta):
    proto = encode_tensor(torch.randn(2, 3, 4))
    proto.buffer = proto.buffer[:delta] if delta < 0 else proto.buffer + b"\0" * delta
    with pytest.raises(ProtocolError, match="buffer"):
        decode_tensor(proto, max_numel=100)


def test_decode_rejects_shape_that_disagrees_with_buffer():
    proto = encode_tensor(torch.randn(2, 3))
    del proto.size[:]
    proto.size.extend([2, 4])
    with pytest.raises(ProtocolError, match="buffer"):
        decode_tensor(proto, max_numel=100)


def test_decode_element_limit():
    proto = encode_tensor(torch.randn(3, 4))
    assert decode_tensor(proto, max_numel=12).shape == (3, 4)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_tensor(proto, max_numel=11)
    # a huge announced shape is refused from the header alone, before any buffer check or allocation
    del proto.size[:]
    proto.size.extend([65536, 65536, 65536])
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_tensor(proto, max_numel=10**9)


def test_decode_rejects_zero_and_too_many_dims():
    with pytest.raises(ProtocolError, match="dimensions"):
        decode_tensor(encode_tensor(torch.tensor(1.5)), max_numel=100)
    with pytest.raises(ProtocolError, match="dimensions"):
        decode_tensor(encode_tensor(torch.randn([1] * 9)), max_numel=100)


# ---- metadata ----


def test_metadata_round_trip():
    meta = {"position": 5, "batch": 2, "name": "x", "nested": {"a": [1, 2]}}
    assert decode_metadata(encode_metadata(meta)) == meta
    assert decode_metadata(b"") == {}


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb(7),
        msgpack.packb("text"),
        msgpack.packb(None),
        b"\xc1",  # a byte msgpack never uses
        b"\x82\xa1a",  # truncated map
        msgpack.packb({"a": 1}) + b"\x00",  # trailing data
        msgpack.packb({1: 2}),  # non-string key
        msgpack.packb({"blob": b"\x00" * 16}, use_bin_type=True),  # binary values are not accepted
        b"\xff" * 32,
    ],
    ids=["list", "int", "str", "nil", "reserved", "truncated", "trailing", "int-key", "bin", "garbage"],
)
def test_decode_metadata_rejects(data):
    with pytest.raises(ProtocolError):
        decode_metadata(data)


def test_get_int():
    meta = {"n": 5, "flag": True, "f": 5.0, "s": "5", "big": 10**12, "neg": -1, "none": None}
    assert get_int(meta, "n", low=0, high=10) == 5
    assert get_int(meta, "n", low=5, high=5) == 5
    assert get_int(meta, "missing", low=0, high=10, default=3) == 3
    for key in ("flag", "f", "s"):
        with pytest.raises(ProtocolError, match="integer"):
            get_int(meta, key, low=0, high=10)
    for key, low, high in (("big", 0, 2**31), ("neg", 0, 10), ("n", 6, 10), ("n", 0, 4)):
        with pytest.raises(ProtocolError, match="outside"):
            get_int(meta, key, low=low, high=high)
    for key in ("missing", "none"):
        with pytest.raises(ProtocolError, match="required"):
            get_int(meta, key, low=0, high=10)


# ---- framing ----


def _frame(marker: bytes, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return marker + size.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + payload


class _BufferWriter:
    """Just enough of asyncio.StreamWriter for P2P.send_protobuf."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def _receive(data: bytes, *, max_bytes: int = 1 << 20, eof: bool = True, proto_type=runtime_pb2.ExpertRequest):
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await asyncio.wait_for(receive_message(reader, proto_type, max_bytes=max_bytes), timeout=5)

    return asyncio.run(main())


def test_receive_clean_eof_returns_none():
    assert _receive(b"") is None


def test_receive_round_trip_through_send_message():
    request = Step(torch.randn(1, 2, 3), 4).encode(uid="2:6")

    async def encode():
        writer = _BufferWriter()
        await send_message(request, writer)
        await send_message(request, writer)
        return bytes(writer.data)

    data = asyncio.run(encode())
    frame_len = len(data) // 2

    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        first = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=frame_len)
        second = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=frame_len)
        third = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=frame_len)
        return first, second, third

    first, second, third = asyncio.run(main())
    assert first == request and second == request and third is None
    assert decode_metadata(first.metadata) == {"position": 4}


def test_receive_size_limit_is_inclusive():
    payload = runtime_pb2.ExpertRequest(uid="0:1").SerializeToString()
    assert _receive(_frame(P2P.MESSAGE_MARKER, payload), max_bytes=len(payload)).uid == "0:1"
    with pytest.raises(MessageTooLargeError):
        _receive(_frame(P2P.MESSAGE_MARKER, payload), max_bytes=len(payload) - 1)


def test_receive_too_large_needs_only_the_header():
    # No payload and no EOF: if receive_message tried to read the payload it would wait (and time out).
    with pytest.raises(MessageTooLargeError, match="exceeds"):
        _receive(_frame(P2P.MESSAGE_MARKER, b"", length=2**40), max_bytes=1024, eof=False)
    with pytest.raises(MessageTooLargeError):
        _receive(_frame(P2P.ERROR_MARKER, b"", length=2**63), max_bytes=1024, eof=False)


def test_receive_error_frame():
    async def encode():
        writer = _BufferWriter()
        await send_error("peer says no", writer)
        return bytes(writer.data)

    with pytest.raises(RemoteError, match="peer says no"):
        _receive(asyncio.run(encode()))
    with pytest.raises(RemoteError, match="boom"):
        _receive(_frame(P2P.ERROR_MARKER, RPCError(message="boom").SerializeToString()))


@pytest.mark.parametrize("marker", [b"\x02", b"\xff", b"{"])
def test_receive_bad_marker(marker):
    with pytest.raises(ProtocolError, match="marker"):
        _receive(_frame(marker, b"abc"))


def test_receive_garbage_payload():
    with pytest.raises(ProtocolError, match="not a valid"):
        _receive(_frame(P2P.MESSAGE_MARKER, b"\xff\xff\xff\xff"))


def test_receive_truncated_frame():
    payload = runtime_pb2.ExpertRequest(uid="0:1").SerializeToString()
    with pytest.raises(asyncio.IncompleteReadError):
        _receive(_frame(P2P.MESSAGE_MARKER, payload)[:-1])
    with pytest.raises(asyncio.IncompleteReadError):
        _receive(P2P.MESSAGE_MARKER + b"\x00\x00")  # header cut short


# ---- validation ----


def test_check_hidden_accepts_good_input():
    limits = make_limits(hidden_size=16, max_batch=4)
    hidden = torch.randn(4, 3, 16)
    assert check_hidden(hidden, limits) is hidden
    assert check_hidden(hidden, limits, batch=4) is hidden


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 16), "3 dimensions"),
        ((1, 2, 3, 16), "3 dimensions"),
        ((2, 3, 15), "hidden size"),
        ((2, 3, 17), "hidden size"),
        ((5, 3, 16), "batch size 5"),
        ((0, 3, 16), "non-empty"),
        ((2, 0, 16), "non-empty"),
    ],
)
def test_check_hidden_rejects_shapes(shape, match):
    with pytest.raises(ProtocolError, match=match):
        check_hidden(torch.zeros(shape), make_limits(hidden_size=16, max_batch=4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_hidden_rejects_non_finite(bad):
    hidden = torch.randn(2, 3, 16)
    hidden[1, 2, 7] = bad
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        check_hidden(hidden, make_limits(hidden_size=16))


def test_check_hidden_rejects_batch_mismatch():
    with pytest.raises(ProtocolError, match="batch size 2"):
        check_hidden(torch.randn(3, 1, 16), make_limits(hidden_size=16), batch=2)


def test_check_span():
    limits = make_limits(start=2, end=6)
    assert check_span(2, 6, limits) == (2, 6)
    assert check_span(3, 4, limits) == (3, 4)
    for start, end in ((1, 4), (2, 7), (4, 4), (5, 3), (-1, 3), (6, 7)):
        with pytest.raises(ProtocolError, match="not served here"):
            check_span(start, end, limits)


def test_parse_span_uid():
    limits = make_limits(start=2, end=6)
    assert parse_span_uid("2:6", limits) == (2, 6)
    assert parse_span_uid("3:5", limits) == (3, 5)
    for uid in ("", "2", "2-6", "2:6:7", "a:b", "-1:3", "2:", ":6", " 2:6", "2.0:6", "1e3:5", "0x2:6", "1" * 10 + ":6"):
        with pytest.raises(ProtocolError, match="start:end"):
            parse_span_uid(uid, limits)
    for uid in ("0:3", "2:7", "4:4", "5:3"):
        with pytest.raises(ProtocolError, match="not served here"):
            parse_span_uid(uid, limits)


def test_check_forward_size():
    limits = make_limits(hidden_size=4, max_length=10, max_forward_tokens=20)
    check_forward_size(torch.zeros(2, 10, 4), limits)  # exactly at both limits
    check_forward_size(torch.zeros(1, 1, 4), limits)
    with pytest.raises(ProtocolError, match="max length"):
        check_forward_size(torch.zeros(1, 11, 4), limits)
    with pytest.raises(ProtocolError, match="limit of 20 tokens"):
        check_forward_size(torch.zeros(3, 7, 4), limits)


def test_limits_max_numel():
    assert make_limits(max_message_bytes=1000).max_numel == 500


# ---- sessions ----


def test_cache_budget_reserve_release():
    budget = CacheBudget(total_tokens=100, max_sessions=2)
    assert (budget.tokens_left, budget.sessions) == (100, 0)
    budget.reserve(60)
    assert (budget.tokens_left, budget.sessions) == (40, 1)
    with pytest.raises(CacheFullError, match="only 40 of 100"):
        budget.reserve(41)
    assert (budget.tokens_left, budget.sessions) == (40, 1)  # a refused reservation takes nothing
    budget.reserve(40)  # exactly fills the budget
    assert (budget.tokens_left, budget.sessions) == (0, 2)
    budget.release(60)
    assert (budget.tokens_left, budget.sessions) == (60, 1)
    budget.release(40)
    assert (budget.tokens_left, budget.sessions) == (100, 0)
    assert issubclass(CacheFullError, ProtocolError) and issubclass(TooManySessionsError, ProtocolError)


def test_cache_budget_session_limit():
    budget = CacheBudget(total_tokens=1000, max_sessions=2)
    budget.reserve(1)
    budget.reserve(1)
    with pytest.raises(TooManySessionsError):
        budget.reserve(1)
    assert (budget.tokens_left, budget.sessions) == (998, 2)
    budget.release(1)
    budget.reserve(1)
    assert budget.sessions == 2


def test_cache_budget_is_thread_safe():
    budget = CacheBudget(total_tokens=200, max_sessions=10_000)
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker():
        barrier.wait()
        for _ in range(10):
            try:
                budget.reserve(3)
                ok = True
            except CacheFullError:
                ok = False
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 66  # floor(200 / 3)
    assert budget.tokens_left == 2 and budget.sessions == 66


@pytest.fixture(scope="module")
def tiny_span() -> BlockSpan:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config = serving_config(config)
    torch.manual_seed(0)
    layers = [LlamaDecoderLayer(config, i).eval() for i in range(2)]
    return BlockSpan(config, 0, 2, layers).eval()


def _step(span: BlockSpan, session: PeerSession, position: int, hidden: torch.Tensor) -> torch.Tensor:
    """What the peer's inference handler does for one step."""
    session.prepare_step(position, hidden.shape[1])
    with torch.no_grad():
        out = span(hidden, session.cache, session.position)
    session.position += hidden.shape[1]
    return out


def test_session_rejects_position_ahead_and_over_max_length(tiny_span):
    session = PeerSession(0, 2, batch=1, max_length=16, cache=tiny_span.new_cache())
    _step(tiny_span, session, 0, torch.randn(1, 6, 32))
    with pytest.raises(ProtocolError, match="holds only 6 tokens"):
        session.prepare_step(7, 1)
    with pytest.raises(ProtocolError, match="max_length 16"):
        session.prepare_step(6, 11)
    with pytest.raises(ProtocolError, match="max_length 16"):
        session.prepare_step(2, 15)  # refused before anything is cropped
    assert session.position == 6 and session.cache.get_seq_length() == 6
    session.prepare_step(6, 10)  # exactly max_length
    assert session.position == 6 and session.cache.get_seq_length() == 6


@pytest.mark.parametrize("rewind_to", [0, 1, 4, 5])
def test_session_rewind_crops_cache(tiny_span, rewind_to):
    torch.manual_seed(1)
    prompt, replacement = torch.randn(1, 6, 32), torch.randn(1, 3, 32)
    session = PeerSession(0, 2, batch=1, max_length=16, cache=tiny_span.new_cache())
    _step(tiny_span, session, 0, prompt)
    assert session.cache.get_seq_length() == 6

    session.prepare_step(rewind_to, replacement.shape[1])
    assert session.position == rewind_to
    assert session.cache.get_seq_length() == rewind_to
    out = _step(tiny_span, session, rewind_to, replacement)
    assert session.position == session.cache.get_seq_length() == rewind_to + 3

    # Same as running the kept prefix plus the replacement from scratch.
    with torch.no_grad():
        expected = tiny_span(torch.cat([prompt[:, :rewind_to], replacement], dim=1))[:, rewind_to:]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_session_rewind_on_plain_dynamic_cache():
    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), layer)
    session = PeerSession(0, 2, batch=1, max_length=32, cache=cache, position=7)
    session.prepare_step(3, 1)
    assert session.position == 3
    assert cache.get_seq_length() == 3
    assert all(layer.keys.shape[-2] == 3 and layer.values.shape[-2] == 3 for layer in cache.layers)
    session.prepare_step(3, 1)  # same position: nothing to crop
    assert cache.get_seq_length() == 3


def test_session_reserved_tokens():
    session = PeerSession(0, 1, batch=3, max_length=20, cache=DynamicCache())
    assert session.reserved_tokens == 60
    other = PeerSession(0, 1, batch=1, max_length=20, cache=DynamicCache())
    assert other.session_id != session.session_id


# ---- typed messages ----


def _linear_shape(block: int, module: str) -> tuple[int, int]:
    return 16, 16


def test_open_session_round_trip_and_version_check():
    from blocks.adapters import Adapters
    from peers.wire import OpenSession, ProtocolError

    limits = make_limits()
    lora = {"lora.3.q_proj.A": torch.randn(2, 16), "lora.3.q_proj.B": torch.randn(16, 2)}
    sent = OpenSession(2, 6, 32, 2, Adapters(lora, lora_scale=0.5, first_block=2))
    got = OpenSession.decode(sent.encode(), limits, _linear_shape)
    assert (got.start, got.end, got.max_length, got.batch, got.version) == (2, 6, 32, 2, 2)
    assert got.adapters.names == sent.adapters.names and got.adapters.lora_scale == 0.5
    assert all(torch.equal(got.adapters.tensors[n], t) for n, t in lora.items())
    with pytest.raises(ProtocolError, match="protocol version 1 is not supported"):
        OpenSession.decode(OpenSession(2, 6, 32, 2, version=1).encode(), limits, _linear_shape)
    from peers.wire import LimitExceeded

    with pytest.raises(LimitExceeded, match="max_batch=4, requested 9") as caught:  # the session's error
        OpenSession.decode(OpenSession(2, 6, 32, 9).encode(), limits, _linear_shape)
    assert (caught.value.setting, caught.value.limit, caught.value.requested) == ("max_batch", 4, 9)
    with pytest.raises(ProtocolError, match="'batch'=0 is outside"):
        OpenSession.decode(OpenSession(2, 6, 32, 0).encode(), limits, _linear_shape)


def test_step_and_reply_round_trip_with_push_chain():
    from peers.wire import Step, StepReply

    chain = (("QmPeerA", "a" * 32), ("QmPeerB", "b" * 32))
    sent = Step(torch.randn(1, 3, 16), 5, step=7, push=chain)
    got = Step.decode(sent.encode(), make_limits(), batch=1, max_length=64)
    assert torch.equal(got.hidden, sent.hidden) and (got.position, got.step, got.push) == (5, 7, chain)
    forwarded = Step.decode(sent.encoded_forward(encode_tensor(sent.hidden), "a" * 32), make_limits(), 1, 64)
    assert forwarded.push == chain[1:] and forwarded.step == 7
    reply = StepReply.decode(StepReply(torch.zeros(1, 3, 16), 8, 0.002, 7).encode(), sent)
    assert reply.position == 8 and reply.compute_s == 0.002
    with pytest.raises(ProtocolError, match="answer to step 7"):
        StepReply.decode(StepReply(torch.zeros(1, 3, 16), 8, 0.002, 6).encode(), sent)
    with pytest.raises(ProtocolError, match="the step's output has shape"):
        StepReply.decode(StepReply(torch.zeros(1, 2, 16), 8, 0.002, 7).encode(), sent)
    with pytest.raises(ProtocolError, match="push token"):
        Step.decode(Step(torch.randn(1, 1, 16), 0, 1, (("QmPeer", "XYZ"),)).encode(), make_limits(), 1, 64)


def test_gradients_must_match_the_request():
    from blocks.adapters import Adapters
    from peers.wire import Gradients

    hidden, adapters = torch.randn(2, 3, 16), Adapters({"deep_prompts": torch.randn(4, 1, 16)}, first_block=2)
    reply = Gradients(torch.ones_like(hidden), adapters.replace({"deep_prompts": torch.ones(4, 1, 16)}))
    got = Gradients.decode(reply.encode(), hidden, adapters)
    assert torch.equal(got.adapters.tensors["deep_prompts"], torch.ones(4, 1, 16))
    with pytest.raises(ProtocolError, match="expected 2 tensor"):
        Gradients.decode(Gradients(torch.ones_like(hidden)).encode(), hidden, adapters)


def test_peer_info_refuses_unknown_and_mistyped_fields():
    from peers.wire import PeerInfo

    info = PeerInfo("m", "p", 0, 4, "float32", "none", 64, 4, "0.1.0", None, {"weight_bytes": 1})
    assert PeerInfo.decode(info.encode()) == info
    data = dataclasses.asdict(info)
    for bad, message in ((dict(data, extra=1), "unknown fields"), (dict(data, start="0"), "'start' must be int")):
        with pytest.raises(ProtocolError, match=message):
            PeerInfo.decode(runtime_pb2.ExpertInfo(serialized_info=encode_metadata(bad)))


def test_protocol_doc_is_current():
    """docs/protocol.md is generated from peers/wire/messages.py: run scripts/protocol_doc.py after changing it."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "protocol_doc.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
