"""Small validation holes found by fuzzing a peer (scripts/fuzz_peer.py), each checked here without a network."""

from __future__ import annotations

import asyncio

import pytest
import torch
from helpers_unit import make_limits
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from blocks.adapters import parse_lora_name
from peers.config import parse_span
from peers.settings import ConfigError
from peers.training import gradients
from peers.wire import ProtocolError, RemoteError, receive_message
from peers.wire.codec import within
from peers.wire.validation import check_adapters, check_backward_size, check_hidden, parse_span_uid

# digits that str.isdigit() accepts and int() refuses (superscripts), or accepts (other scripts' digits)
OTHER_DIGITS = ["\u00b2", "\u2074", "\u0663", "\uff13", "\u09e9"]


@pytest.mark.parametrize("digit", OTHER_DIGITS)
def test_span_fields_take_ascii_digits_only(digit):
    limits = make_limits(start=2, end=6)
    for uid in (f"{digit}:6", f"2:{digit}", f"{digit}:{digit}"):
        with pytest.raises(ProtocolError, match="start:end"):
            parse_span_uid(uid, limits)
    with pytest.raises(ConfigError, match="must look like A:B"):
        parse_span(f"0:{digit}")


def test_lora_names_take_ascii_digits_only():
    assert parse_lora_name("lora.3.q_proj.A") == (3, "q_proj", "A")
    for digit in OTHER_DIGITS:
        assert parse_lora_name(f"lora.{digit}.q_proj.A") is None


def test_two_names_of_one_lora_part_are_refused():
    """'lora.3...' and 'lora.03...' name the same part: the second would replace the first after its check."""
    limits = make_limits(start=2, end=6, hidden_size=16)
    hidden = torch.randn(1, 3, 16)
    good_a, bad_a, b = torch.randn(4, 16), torch.randn(4, 99), torch.randn(16, 4)
    names = ["lora.3.q_proj.A", "lora.03.q_proj.A", "lora.3.q_proj.B"]
    with pytest.raises(ProtocolError, match="a second LoRA A of block 3 q_proj"):
        check_adapters(names, [good_a, bad_a, b], hidden, 2, 6, limits, lambda block, module: (16, 16))
    ok = check_adapters([names[0], names[2]], [good_a, b], hidden, 2, 6, limits, lambda block, module: (16, 16))
    assert list(ok) == [names[0], names[2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_within_bounds_values_and_refuses_non_finite(dtype):
    assert within(torch.tensor([-3.0, 0.0, 5.0], dtype=dtype), 5.0)
    assert not within(torch.tensor([-3.0, 0.0, 5.5], dtype=dtype), 5.0)
    assert not within(torch.tensor([-5.5, 0.0], dtype=dtype), 5.0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not within(torch.tensor([1.0, bad, 2.0], dtype=dtype), 1e9)


def test_huge_values_are_refused_by_name():
    limits = make_limits(hidden_size=16, max_abs_value=1e6)
    hidden = torch.randn(1, 3, 16)
    check_hidden(hidden * 1e5, limits)
    with pytest.raises(ProtocolError, match=r"hidden states contain values beyond \+-1e\+06"):
        check_hidden(hidden * 1e7 + 1e7, limits)
    with pytest.raises(ProtocolError, match="hidden states contain NaN or infinite values"):
        check_hidden(torch.full((1, 3, 16), float("nan")), limits)
    with pytest.raises(ProtocolError, match="output gradients contain values beyond"):
        check_backward_size(hidden, torch.full((1, 3, 16), 3e38), limits)
    with pytest.raises(ProtocolError, match="contain values beyond"):
        check_adapters(["deep_prompts"], [torch.full((4, 1, 16), 3e38)], hidden, 2, 6, limits, lambda b, m: (16, 16))


def test_overflowing_gradients_are_a_clear_error():
    weight = torch.full((4, 4), 1e30, requires_grad=True)
    x = torch.ones(1, 4, requires_grad=True)
    out = x @ weight
    with pytest.raises(ProtocolError, match="overflowed"):
        gradients([x, weight], out, torch.full((1, 4), 1e30), torch.float32)
    out = x @ torch.eye(4)
    assert gradients([x], out, torch.ones(1, 4), torch.float32)[0].tolist() == [[1.0] * 4]


def _receive(data: bytes):
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=1 << 20)

    return asyncio.run(main())


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0b"])
def test_corrupt_error_frames_are_protocol_errors(payload):
    frame = P2P.ERROR_MARKER + len(payload).to_bytes(8, "big") + payload
    with pytest.raises(ProtocolError, match="not a valid RPCError"):
        _receive(frame)
    # a message that is not UTF-8 is still shown, its bad bytes replaced
    with pytest.raises(RemoteError, match="x\ufffdy"):
        _receive(P2P.ERROR_MARKER + (5).to_bytes(8, "big") + b"\x0a\x03x\xffy")
    with pytest.raises(RemoteError, match="fine"):
        _receive(P2P.ERROR_MARKER + (6).to_bytes(8, "big") + b"\x0a\x04fine")
