"""Attack a real peer the way a malicious client would, while an honest client generates through it.

    python scripts/fuzz_peer.py [MODEL_DIR] --messages 10000          # prints one JSON object

Starts one `swarm-peer` on 127.0.0.1 (a tiny random checkpoint unless MODEL_DIR is given) with small limits, an
honest client that generates greedily in one long inference session (tokens compared with local transformers,
each step timed), and an attacker that speaks the wire protocol directly from its own libp2p identities: malformed
frames, bad tensors and headers, bad metadata fields, wrong message types, huge sizes, unknown handlers, forged and
replayed DHT records and DHT floods, malformed pushes into a session whose push token it knows, abusive backward
and train requests, and abusive but well-formed load (session floods, the largest forwards, idle and half-sent
streams).

Every message's outcome is classified: a clear error (an error frame that names the problem, a refused DHT store,
a refused stream), an internal error (an error frame saying "internal error", i.e. a failure of the peer's own
code), accepted (a normal answer: a hole when the message was malformed; fine for well-formed abuse), closed or
timed out. The JSON also has the peer's own count of internal errors (PeerInfo stats), tracebacks in its log,
whether it crashed, its peak RSS and the honest client's results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.protocol import DHTProtocol  # noqa: E402
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.dht.validation import DHTRecord  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402
from hivemind.proto import dht_pb2, runtime_pb2  # noqa: E402
from hivemind.proto.p2pd_pb2 import RPCError  # noqa: E402
from hivemind.utils import MSGPackSerializer  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402

from dht.records import block_key  # noqa: E402
from peers.wire import (  # noqa: E402
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PUSH_HANDLER,
    TRAIN_HANDLER,
    Forward,
    GradOutput,
    OpenSession,
    PeerInfo,
    RemoteError,
    SessionOpened,
    Step,
    encode_tensor,
    receive_message,
)
from peers.wire.framing import frame  # noqa: E402

# The peer's limits during the attack: small, so that "huge" requests are cheap to build.
MAX_LENGTH = 64
MAX_BATCH = 4
MAX_MESSAGE_BYTES = 1 << 20
MAX_FORWARD_TOKENS = 512
MAX_BACKWARD_TOKENS = 256
DHT_MAX_SENDER_VALUES = 256
PEER_ARGS = [
    "--log-level", "WARNING",
    "--max-length", str(MAX_LENGTH),
    "--max-batch", str(MAX_BATCH),
    "--max-message-bytes", str(MAX_MESSAGE_BYTES),
    "--max-forward-tokens", str(MAX_FORWARD_TOKENS),
    "--max-backward-tokens", str(MAX_BACKWARD_TOKENS),
    "--max-held-tokens", str(MAX_BACKWARD_TOKENS),
    "--train-hold-timeout", "5",
    "--session-idle-timeout", "20",
    "--cache-tokens", "16384",
    "--max-sessions", "48",
    "--dht-max-sender-values", str(DHT_MAX_SENDER_VALUES),
]  # fmt: skip
ANSWER_TIMEOUT = 30.0  # seconds to wait for the peer's first answer to one message
HONEST_PROMPT_TOKENS = 6
HONEST_NEW_TOKENS = 10
INTERNAL = "internal error"


@dataclass
class Case:
    """One abusive message: its category, what it is, and how to send it (returns an outcome)."""

    category: str
    name: str
    run: Callable[[], Awaitable[str]]
    malformed: bool = True  # False: well-formed abuse, for which a normal answer is fine


@dataclass
class Tally:
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, case: Case, outcome: str) -> None:
        kind = outcome.split(":", 1)[0]
        if kind == "accepted" and case.malformed:
            kind = "accepted_malformed"
        self.outcomes[case.category][kind] += 1
        if kind in ("internal", "accepted_malformed", "timeout", "error") and len(self.examples[kind]) < 12:
            self.examples[kind].append(f"{case.category}/{case.name}: {outcome[:300]}")


# ---- talking to the peer ----


def raw_frame(payload: bytes, marker: bytes = b"\x00", length: int | None = None) -> bytes:
    return marker + (len(payload) if length is None else length).to_bytes(8, "big") + payload


def classify_error(text: str) -> str:
    return f"internal:{text}" if text.startswith(INTERNAL) else f"clear:{text}"


class Attacker:
    """The attacker's libp2p identities and its ways of sending messages to one peer."""

    def __init__(self, p2ps: list[P2P], peer: PeerID, rng: random.Random):
        self.p2ps, self.peer, self.rng = p2ps, peer, rng
        self.p2p = p2ps[0]
        self.held: list[asyncio.StreamWriter] = []  # idle streams and sessions kept open on purpose

    async def exchange(
        self,
        handler: str,
        data: bytes,
        *,
        p2p: P2P | None = None,
        answers: int = 1,
        keep: bool = False,
        hang_up: bool = False,
    ) -> str:
        """Write `data` on a new stream of `handler`; the outcome of the first answer (or of the `answers`-th).
        `hang_up`: close the stream right after writing (a sender that gives up mid-frame), expecting no answer."""
        try:
            _, reader, writer = await asyncio.wait_for(
                (p2p or self.p2p).call_binary_stream_handler(self.peer, handler), ANSWER_TIMEOUT
            )
        except TimeoutError:
            return "timeout:opening the stream"
        except Exception as e:  # the daemon refuses unknown protocols and streams over a quota
            return f"clear:stream refused: {e!r}"
        try:
            writer.write(data)
            await writer.drain()
            if hang_up:
                return "closed:hung up"
            outcome = "closed"
            for _ in range(answers):
                outcome = await self.answer(reader)
                if not outcome.startswith("accepted"):
                    break
            return outcome
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            return f"closed:{e!r}"
        finally:
            if keep:
                self.held.append(writer)
            else:
                writer.close()

    @staticmethod
    async def answer(reader: asyncio.StreamReader) -> str:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                reply = await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=64 * MAX_MESSAGE_BYTES)
        except TimeoutError:
            return "timeout:no answer"
        except RemoteError as e:
            return classify_error(str(e))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            return f"closed:{e!r}"
        return "closed:end of stream" if reply is None else "accepted"

    async def info(self) -> PeerInfo:
        reply = await self.p2p.call_protobuf_handler(
            self.peer, INFO_HANDLER, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo
        )
        return PeerInfo.decode(reply)

    async def close_held(self) -> None:
        for writer in self.held:
            writer.close()
        self.held.clear()


# ---- the categories of abuse ----


def hidden(rng: random.Random, batch: int = 1, tokens: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(rng.randrange(2**31)))


def request(uid: str, tensors: list, meta: Any) -> bytes:
    metadata = meta if isinstance(meta, bytes) else msgpack.packb(meta, use_bin_type=True)
    proto = runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=metadata)
    return raw_frame(proto.SerializeToString())


def bad_tensors(rng: random.Random, h: int) -> list[tuple[str, runtime_pb2.Tensor]]:
    good = encode_tensor(hidden(rng, size=h))
    cases = []

    def variant(name: str, **changes: Any) -> None:
        t = runtime_pb2.Tensor()
        t.CopyFrom(good)
        for key, value in changes.items():
            if key == "size":
                del t.size[:]
                t.size.extend(value)
            else:
                setattr(t, key, value)
        cases.append((name, t))

    for dtype in ("float64", "int64", "bool", "uint8", "", "float32\x00", "Float32", "complex64", "x" * 300):
        variant(f"dtype {dtype[:12]!r}", dtype=dtype)
    variant("compressed", compression=runtime_pb2.CompressionType.FLOAT16)
    variant("chunked", chunks=7)
    variant("no dims", size=[])
    variant("9 dims", size=[1] * 9)
    variant("shape disagrees with buffer", size=[1, 3, h + 1])
    variant("buffer short", buffer=good.buffer[:-4])
    variant("buffer long", buffer=good.buffer + b"\x00" * 4)
    variant("empty buffer", buffer=b"")
    variant("huge shape", size=[2**32 - 1] * 4)
    variant("zero dim", size=[1, 0, h], buffer=b"")
    variant("2d", size=[3, h])
    for value, label in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (3e38, "3e38"), (1e12, "1e12")):
        cases.append((f"values {label}", encode_tensor(torch.full((1, 3, h), value))))
    cases.append(("wrong hidden size", encode_tensor(hidden(rng, size=h + 1))))
    cases.append(("batch over limit", encode_tensor(hidden(rng, batch=MAX_BATCH + 1, size=h))))
    return cases


OTHER_DIGITS = ["\u00b2", "\u2074", "\u0663", "\uff13", "\u00b9\u00b2", "\u0969"]


def bad_uids(span: tuple[int, int]) -> list[str]:
    s, e = span
    uids = [f"{d}:{e}" for d in OTHER_DIGITS] + [f"{s}:{d}" for d in OTHER_DIGITS]
    uids += ["", ":", f"{s}", f"{s}:{e}:{e}", f"-1:{e}", f"{s}:-1", f"{e}:{s}", f"{s}:{e + 1}", f"{s}:{s}"]
    uids += [f" {s}:{e}", f"{s}:{e} ", f"0x0:{e}", f"{s}.0:{e}", "9" * 12 + f":{e}", f"{s}:" + "9" * 400]
    uids += ["\u202e0:4", "0\u200b:4", "x" * 5000, f"{s}:{e}\x00"]
    return uids


WEIRD_VALUES: list[Any] = [
    None, True, 1.5, -1, 0, 2**63 - 1, -(2**63), "8", "", [], {}, [1, 2], {"a": 1}, b"bytes", "x" * 10000,
    float("nan"), float("inf"), 10**18,
]  # fmt: skip


def forward_cases(a: Attacker, span: tuple[int, int], h: int) -> list[Case]:
    rng, uid = a.rng, f"{span[0]}:{span[1]}"
    cases = []
    for name, tensor in bad_tensors(rng, h):
        for handler in (FORWARD_HANDLER, TRAIN_HANDLER, BACKWARD_HANDLER):
            data = request(uid, [tensor, tensor] if handler == BACKWARD_HANDLER else [tensor], {})
            cases.append(Case("bad_tensors", f"{handler.rsplit('.', 1)[1]}: {name}", _send(a, handler, data)))
    good = encode_tensor(hidden(rng, size=h))
    for bad in bad_uids(span):
        for handler in (FORWARD_HANDLER, BACKWARD_HANDLER, INFERENCE_HANDLER):
            meta = {"version": 2, "max_length": 8, "batch": 1} if handler == INFERENCE_HANDLER else {}
            tensors = [] if handler == INFERENCE_HANDLER else [good, good]
            cases.append(Case("bad_fields", f"uid {bad[:20]!r}", _send(a, handler, request(bad, tensors, meta))))
    for key in ("adapters", "lora_scale"):
        for value in WEIRD_VALUES:
            if _valid(key, value):
                continue
            cases.append(
                Case(
                    "bad_fields", f"{key}={value!r:.20}", _send(a, FORWARD_HANDLER, request(uid, [good], {key: value}))
                )
            )
    for names in (["lora.\u0663.q_proj.A"], ["lora.1.q_proj.A", "lora.01.q_proj.A"], ["deep_prompts", "deep_prompts"]):
        tensors = [good] + [encode_tensor(torch.randn(4, h))] * len(names)
        cases.append(
            Case(
                "bad_fields", f"adapters {names}", _send(a, FORWARD_HANDLER, request(uid, tensors, {"adapters": names}))
            )
        )
    for meta in (b"\xc1", b"\x93\x01\x02\x03", b"\x81\x01\x02", b"\xff" * 40, b"\x82\xa1a", b"\xdf\xff\xff\xff\xff"):
        cases.append(
            Case("bad_fields", f"metadata {meta[:8]!r}", _send(a, FORWARD_HANDLER, request(uid, [good], meta)))
        )
    for field_name in ("version", "max_length", "batch"):
        for value in WEIRD_VALUES:
            meta = {"version": 2, "max_length": 8, "batch": 1, field_name: value}
            cases.append(
                Case(
                    "bad_fields",
                    f"open {field_name}={value!r:.20}",
                    _send(a, INFERENCE_HANDLER, request(uid, [], meta)),
                )
            )
    return cases


def _valid(key: str, value: Any) -> bool:
    """Values among WEIRD_VALUES that are fine for `key` (no adapters; a modest LoRA scale)."""
    if key == "adapters":
        return value == []
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and abs(value) <= 1e4


def _send(a: Attacker, handler: str, data: bytes, **kwargs: Any) -> Callable[[], Awaitable[str]]:
    return lambda: a.exchange(handler, data, **kwargs)


def frame_cases(a: Attacker, span: tuple[int, int], h: int) -> list[Case]:
    rng = a.rng
    handlers = (FORWARD_HANDLER, BACKWARD_HANDLER, TRAIN_HANDLER, INFERENCE_HANDLER)
    good = Forward(span[0], span[1], hidden(rng, size=h)).encode().SerializeToString()
    cases = []
    for handler in handlers:
        short = handler.rsplit(".", 1)[1]
        frames = {
            "bad marker": raw_frame(b"x" * 10, marker=bytes([rng.choice([2, 7, 255])])),
            "huge header": raw_frame(b"", length=2**63),
            "header over limit": raw_frame(b"", length=MAX_MESSAGE_BYTES + 1),
            "garbage protobuf": raw_frame(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))),
            "corrupt error frame": raw_frame(b"\xff\xff\xff", marker=b"\x01"),
            "non-utf8 error frame": raw_frame(b"\x0a\x02\xff\xfe", marker=b"\x01"),
            "error frame": raw_frame(RPCError(message="you lose").SerializeToString(), marker=b"\x01"),
            "response instead of request": raw_frame(runtime_pb2.ExpertResponse(tensors=[]).SerializeToString()),
            "info proto instead of request": raw_frame(
                runtime_pb2.ExpertInfo(serialized_info=b"\x01").SerializeToString()
            ),
            "dht proto instead of request": raw_frame(dht_pb2.PingRequest(validate=True).SerializeToString()),
            "empty request": raw_frame(b""),
            "random bytes": bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
            "string uid not utf-8": raw_frame(b"\x0a\x02\xff\xfe"),
        }
        for name, data in frames.items():
            cases.append(Case("malformed_frames", f"{short}: {name}", _send(a, handler, data)))
        for name, data in (("truncated frame", raw_frame(good)[: rng.randrange(1, 40)]), ("nothing", b"")):
            cases.append(Case("malformed_frames", f"{short}: {name}, hung up", _send(a, handler, data, hang_up=True)))
    return cases


def size_cases(a: Attacker, span: tuple[int, int], h: int) -> list[Case]:
    rng, uid = a.rng, f"{span[0]}:{span[1]}"
    cases = []
    over = hidden(rng, 1, MAX_MESSAGE_BYTES // (4 * h) + 2, h)
    cases.append(
        Case(
            "huge_sizes",
            "message over the byte limit",
            _send(a, FORWARD_HANDLER, request(uid, [encode_tensor(over)], {})),
        )
    )
    too_long = encode_tensor(hidden(rng, 1, MAX_LENGTH + 1, h))
    cases.append(
        Case("huge_sizes", "sequence over max length", _send(a, FORWARD_HANDLER, request(uid, [too_long], {})))
    )
    tokens = encode_tensor(hidden(rng, MAX_BATCH, MAX_FORWARD_TOKENS // MAX_BATCH + 1, h))
    cases.append(Case("huge_sizes", "forward over token limit", _send(a, FORWARD_HANDLER, request(uid, [tokens], {}))))
    backward = hidden(rng, MAX_BATCH, MAX_BACKWARD_TOKENS // MAX_BATCH + 1, h)
    data = request(uid, [encode_tensor(backward)] * 2, {})
    cases.append(Case("huge_sizes", "backward over token limit", _send(a, BACKWARD_HANDLER, data)))
    meta = {"version": 2, "max_length": 10**9, "batch": 10**6}
    cases.append(Case("huge_sizes", "session of 1e15 tokens", _send(a, INFERENCE_HANDLER, request(uid, [], meta))))
    many = [encode_tensor(torch.zeros(1))] * 20000
    cases.append(
        Case("huge_sizes", "20000 tensors", _send(a, FORWARD_HANDLER, request(uid, many, {"adapters": ["x"] * 20000})))
    )
    deep = {"a": None}
    for _ in range(2000):
        deep = {"a": deep}
    try:
        nested = msgpack.packb(deep)
    except ValueError:
        nested = b"\x81\xa1a" * 2000 + b"\xc0"
    cases.append(Case("huge_sizes", "metadata nested 2000 deep", _send(a, FORWARD_HANDLER, request(uid, [], nested))))
    cases.append(
        Case(
            "huge_sizes",
            "push chain of 10000 hops",
            _step_in_new_session(a, span, h, lambda s, t: {"position": 0, "push": [["x", t]] * 10000}),
        )
    )
    return cases


def type_cases(a: Attacker, span: tuple[int, int], h: int) -> list[Case]:
    """Wrong message types on the unary info handler and unknown handlers."""
    cases = []
    wrong = [
        dht_pb2.PingRequest(validate=True),
        runtime_pb2.ExpertRequest(uid="x" * 1000),
        dht_pb2.StoreRequest(keys=[b"k"]),
    ]
    for proto in wrong:

        async def call(proto=proto) -> str:
            try:
                await a.p2p.call_protobuf_handler(a.peer, INFO_HANDLER, proto, runtime_pb2.ExpertInfo)
                return "accepted"
            except Exception as e:
                return f"clear:{e!r}"

        cases.append(Case("wrong_types", f"info with {type(proto).__name__}", call, malformed=False))
    for name in ("blockswarm.v2.nope", "blockswarm.v1.forward", "/" * 3, "DHTProtocol.rpc_nope", "x" * 500):
        data = raw_frame(b"\x0a\x01x")
        cases.append(Case("unknown_handlers", name[:30], _send(a, name, data)))
    return cases


def session_misuse_cases(a: Attacker, span: tuple[int, int], h: int) -> list[Case]:
    """Well-opened sessions, then malformed steps (the client's own session ends with a clear error)."""
    rng = a.rng
    steps = {
        "position beyond cache": lambda s, t: {"position": 5},
        "position negative": lambda s, t: {"position": -1},
        "position str": lambda s, t: {"position": "0"},
        "step number negative": lambda s, t: {"position": 0, "step": -5},
        "step number float": lambda s, t: {"position": 0, "step": 1.0},
        "push not a list": lambda s, t: {"position": 0, "push": "x"},
        "push hop bad token": lambda s, t: {"position": 0, "push": [["peer", "XYZ"]]},
        "push hop bad peer id": lambda s, t: {"position": 0, "push": [["not-a-peer-id", t]]},
        "push hop wrong arity": lambda s, t: {"position": 0, "push": [["a", t, "c"]]},
    }
    cases = [Case("session_misuse", name, _step_in_new_session(a, span, h, meta)) for name, meta in steps.items()]
    for name, tensor in bad_tensors(rng, h)[:12]:
        cases.append(
            Case(
                "session_misuse",
                f"step tensor: {name}",
                _step_in_new_session(a, span, h, lambda s, t: {"position": 0}, tensor),
            )
        )
    return cases


def _step_in_new_session(
    a: Attacker,
    span: tuple[int, int],
    h: int,
    meta: Callable[[int, str], Any],
    tensor: runtime_pb2.Tensor | None = None,
) -> Callable[[], Awaitable[str]]:
    """Open a session (must succeed or be refused clearly), then send one step built from `meta(session, token)`."""

    async def run() -> str:
        try:
            _, reader, writer = await asyncio.wait_for(
                a.p2p.call_binary_stream_handler(a.peer, INFERENCE_HANDLER), ANSWER_TIMEOUT
            )
        except Exception as e:
            return f"clear:stream refused: {e!r}"
        try:
            writer.write(frame(OpenSession(span[0], span[1], 16, 1).encode()))
            await writer.drain()
            async with asyncio.timeout(ANSWER_TIMEOUT):
                opened = SessionOpened.decode(
                    await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=1 << 20)
                )
            t = tensor if tensor is not None else encode_tensor(hidden(a.rng, 1, 2, h))
            writer.write(request("", [t], meta(opened.session_id, opened.push_token)))
            await writer.drain()
            return await a.answer(reader)
        except RemoteError as e:  # the opening was refused (e.g. the peer's session limit)
            return classify_error(str(e))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as e:
            return f"closed:{e!r}"
        finally:
            writer.close()

    return run


class PushTarget:
    """The attacker's own session, whose push token it knows: malformed pushes into it must be dropped alone (the
    session keeps answering its client's steps)."""

    def __init__(self, a: Attacker, span: tuple[int, int], h: int):
        self.a, self.span, self.h = a, span, h
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.token = ""
        self.lock = asyncio.Lock()
        self.sessions_ended = 0
        self.into_session = 0  # bad pushes addressed to the session in a well-formed frame (the peer drops each)

    async def ensure_open(self) -> None:
        if self.writer is not None:
            return
        _, self.reader, self.writer = await self.a.p2p.call_binary_stream_handler(self.a.peer, INFERENCE_HANDLER)
        self.writer.write(frame(OpenSession(self.span[0], self.span[1], MAX_LENGTH, 1).encode()))
        await self.writer.drain()
        reply = await receive_message(self.reader, runtime_pb2.ExpertResponse, max_bytes=1 << 20)
        self.token = SessionOpened.decode(reply).push_token

    def cases(self) -> list[Case]:
        rng, h = self.a.rng, self.h
        bad: list[tuple[str, Callable[[str], bytes]]] = [
            (name, lambda tok, t=t: request(tok, [t], {"position": 0, "step": 10**6}))
            for name, t in bad_tensors(rng, h)
        ]
        good = encode_tensor(hidden(rng, 1, 1, h))
        bad += [
            ("position beyond cache", lambda tok: request(tok, [good], {"position": MAX_LENGTH, "step": 10**6})),
            ("metadata garbage", lambda tok: request(tok, [good], b"\xc1")),
            ("no tensors", lambda tok: request(tok, [], {"position": 0})),
            ("two tensors", lambda tok: request(tok, [good, good], {"position": 0})),
            ("push chain bad", lambda tok: request(tok, [good], {"position": 0, "push": [[1, 2]]})),
            ("step str", lambda tok: request(tok, [good], {"position": 0, "step": "1"})),
        ]
        cases = [Case("bad_pushes", name, lambda make=make: self.push(make, True)) for name, make in bad]
        elsewhere: list[tuple[str, Callable[[str], bytes]]] = [
            ("garbage frame", lambda tok: raw_frame(b"\xff\xfe\xfd")),
            ("unknown token", lambda tok: request("0" * 32, [good], {"position": 0})),
        ]
        return cases + [Case("bad_pushes", name, lambda make=make: self.push(make, False)) for name, make in elsewhere]

    async def push(self, make: Callable[[str], bytes], into_session: bool) -> str:
        """Push one malformed step, then a valid client step: "clear" if the session still answers it."""
        async with self.lock:
            try:
                await self.ensure_open()
            except Exception as e:
                self.writer = None
                return f"error:could not open the target session: {e!r}"
            try:
                _, _, push_writer = await self.a.p2p.call_binary_stream_handler(self.a.peer, PUSH_HANDLER)
                push_writer.write(make(self.token))
                await push_writer.drain()
                push_writer.close()
                self.into_session += into_session
                self.writer.write(frame(Step(hidden(self.a.rng, 1, 1, self.h), 0).encode()))
                await self.writer.drain()
                outcome = await self.a.answer(self.reader)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                outcome = f"closed:{e!r}"
            if outcome == "accepted":
                return "clear:dropped alone, the session answered its next step"
            self.sessions_ended += 1
            self.writer.close()
            self.writer = None
            return outcome if outcome.startswith("internal") else f"session_ended:{outcome}"


def backward_cases(a: Attacker, span: tuple[int, int], h: int) -> list[Case]:
    rng, uid = a.rng, f"{span[0]}:{span[1]}"
    x = hidden(rng, 1, 3, h)
    g = encode_tensor(hidden(rng, 1, 3, h))
    cases = []
    variants: dict[str, tuple[list, Any]] = {
        "unnamed extra tensor": ([encode_tensor(x), g, encode_tensor(torch.randn(7))], {}),
        "unnamed extra tensors with empty names": (
            [encode_tensor(x), g, encode_tensor(torch.randn(7))],
            {"adapters": []},
        ),
        "3e38 gradients": ([encode_tensor(x), encode_tensor(torch.full((1, 3, h), 3e38))], {}),
        "-3e38 gradients": ([encode_tensor(x), encode_tensor(torch.full((1, 3, h), -3e38))], {}),
        "1e30 hidden": ([encode_tensor(x * 1e30), g], {}),
        "gradient of another shape": ([encode_tensor(x), encode_tensor(hidden(rng, 1, 4, h))], {}),
        "gradient of another dtype": ([encode_tensor(x), encode_tensor(hidden(rng, 1, 3, h).half())], {}),
        "no gradient": ([encode_tensor(x)], {}),
        "lora scale 1e300": ([encode_tensor(x), g], {"lora_scale": 1e300}),
        "deep prompts too long": (
            [encode_tensor(x), g, encode_tensor(torch.randn(span[1] - span[0], 9, h))],
            {"adapters": ["deep_prompts"]},
        ),
        "lora wrong shape": (
            [encode_tensor(x), g, encode_tensor(torch.randn(4, h + 1)), encode_tensor(torch.randn(h, 4))],
            {"adapters": [f"lora.{span[0]}.q_proj.A", f"lora.{span[0]}.q_proj.B"]},
        ),
        "lora rank 0": (
            [encode_tensor(x), g, encode_tensor(torch.randn(0, h)), encode_tensor(torch.randn(h, 0))],
            {"adapters": [f"lora.{span[0]}.q_proj.A", f"lora.{span[0]}.q_proj.B"]},
        ),
        "lora module not allowed": (
            [encode_tensor(x), g, encode_tensor(torch.randn(4, h)), encode_tensor(torch.randn(h, 4))],
            {"adapters": [f"lora.{span[0]}.embed.A", f"lora.{span[0]}.embed.B"]},
        ),
        "lora block outside span": (
            [encode_tensor(x), g, encode_tensor(torch.randn(4, h)), encode_tensor(torch.randn(h, 4))],
            {"adapters": [f"lora.{span[1] + 5}.q_proj.A", f"lora.{span[1] + 5}.q_proj.B"]},
        ),
    }
    for name, (tensors, meta) in variants.items():
        cases.append(Case("abusive_backward", name, _send(a, BACKWARD_HANDLER, request(uid, tensors, meta))))
    # the train handler: a good forward, then a bad second frame
    first = frame(Forward(span[0], span[1], x).encode())
    seconds = {
        "3e38 gradient": frame(GradOutput(torch.full((1, 3, h), 3e38)).encode()),
        "gradient of another shape": frame(GradOutput(hidden(rng, 1, 2, h)).encode()),
        "garbage second frame": raw_frame(b"\xff\xff"),
        "second frame cut short": frame(GradOutput(x).encode())[:30],
    }
    for name, second in seconds.items():
        cases.append(Case("abusive_backward", f"train: {name}", _send(a, TRAIN_HANDLER, first + second, answers=2)))
    return cases


def abuse_cases(a: Attacker, span: tuple[int, int], h: int, count: int) -> list[Case]:
    """Well-formed but abusive: session floods, the largest forwards, idle and half-sent streams, from two
    identities. A normal answer or a clear refusal are both fine; the peer must stay up for the honest client."""
    rng = a.rng
    cases = []
    for i in range(count):
        kind = i % 4
        p2p = a.p2ps[i % len(a.p2ps)]
        if kind == 0:
            data = frame(OpenSession(span[0], span[1], MAX_LENGTH, MAX_BATCH).encode())
            cases.append(
                Case(
                    "abusive_load",
                    "session flood (kept open)",
                    _send(a, INFERENCE_HANDLER, data, p2p=p2p, keep=True),
                    malformed=False,
                )
            )
        elif kind == 1:
            data = frame(Forward(span[0], span[1], hidden(rng, MAX_BATCH, MAX_FORWARD_TOKENS // MAX_BATCH, h)).encode())
            cases.append(
                Case("abusive_load", "largest forward", _send(a, FORWARD_HANDLER, data, p2p=p2p), malformed=False)
            )
        elif kind == 2:
            cases.append(Case("abusive_load", "idle stream (kept open)", _idle(a, p2p, b""), malformed=False))
        else:
            half = frame(Forward(span[0], span[1], hidden(rng, 1, 8, h)).encode())
            cases.append(
                Case(
                    "abusive_load",
                    "half-sent frame (kept open)",
                    _idle(a, p2p, half[: len(half) // 2]),
                    malformed=False,
                )
            )
    return cases


def _idle(a: Attacker, p2p: P2P, data: bytes) -> Callable[[], Awaitable[str]]:
    async def run() -> str:
        try:
            _, _, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(a.peer, FORWARD_HANDLER), ANSWER_TIMEOUT
            )
        except Exception as e:
            return f"clear:stream refused: {e!r}"
        writer.write(data)
        await writer.drain()
        a.held.append(writer)
        return "accepted:held open"

    return run


# ---- the DHT ----


STORE = DHTProtocol._get_handle_name(None, "rpc_store")
FIND = DHTProtocol._get_handle_name(None, "rpc_find")


class DhtAttack:
    """Forged, replayed and schema-breaking block records, floods of junk values, garbage store requests."""

    def __init__(self, a: Attacker, prefix: str, num_blocks: int):
        self.a, self.prefix, self.num_blocks = a, prefix, num_blocks
        self.signer = RSASignatureValidator(RSAPrivateKey())
        self.forged_accepted = 0
        self.flood_accepted = 0
        self.flood_tried = 0
        self.original: dict[int, tuple[bytes, bytes, float]] = {}  # block -> the peer's (subkey, value, expiration)

    async def store(self, key: bytes, subkey: bytes, value: bytes, expiration: float, p2p: P2P | None = None) -> bool:
        req = dht_pb2.StoreRequest(
            keys=[key], subkeys=[subkey], values=[value], expiration_time=[expiration], in_cache=[False]
        )
        reply = await (p2p or self.a.p2p).call_protobuf_handler(self.a.peer, STORE, req, dht_pb2.StoreResponse)
        return bool(reply.store_ok and reply.store_ok[0])

    async def find(self, key: bytes) -> dict:
        reply = await self.a.p2p.call_protobuf_handler(
            self.a.peer, FIND, dht_pb2.FindRequest(keys=[key]), dht_pb2.FindResponse
        )
        result = reply.results[0]
        if result.type != dht_pb2.FOUND_DICTIONARY:
            return {}
        return {k: (v, e) for k, (v, e) in MSGPackSerializer.loads(result.value).items()}

    def key(self, block: int) -> bytes:
        return DHTID.generate(source=block_key(self.prefix, block)).to_bytes()

    async def snapshot(self) -> dict[int, dict]:
        return {b: await self.find(self.key(b)) for b in range(self.num_blocks)}

    def cases(self, floods: int) -> list[Case]:
        rng = self.a.rng
        cases = []
        for i in range(40):
            cases.append(Case("dht_forged", f"forged record {i % 4}", lambda i=i: self.forge(i % 4)))
        for i in range(40):
            cases.append(Case("dht_replayed", f"replayed record {i % 2}", lambda i=i: self.replay(i % 2)))
        for i in range(20):
            cases.append(Case("dht_forged", "own signed subkey, bad schema", lambda i=i: self.bad_schema(i)))
        for i in range(floods):
            big = i % 10 == 0
            cases.append(
                Case(
                    "dht_flood",
                    "1 MiB value" if big else "junk subkey",
                    lambda i=i, big=big: self.flood(i, big),
                    malformed=big,
                )
            )
        garbage = [
            dht_pb2.StoreRequest(
                keys=[b"k", b"k2"], subkeys=[b""], values=[b"v"], expiration_time=[1.0], in_cache=[False]
            ),
            dht_pb2.StoreRequest(
                keys=[self.key(0)],
                subkeys=[b""],
                values=[b"\xff\xfe"],
                expiration_time=[get_dht_time() + 60],
                in_cache=[False],
            ),
            dht_pb2.StoreRequest(
                keys=[b"\x00" * 3], subkeys=[b"\xc1"], values=[b"v"], expiration_time=[math.nan], in_cache=[True]
            ),
        ]
        for j, req in enumerate(garbage):
            cases.append(Case("dht_garbage", f"garbage store {j}", lambda req=req: self.raw_store(req)))
        del rng
        return cases

    async def raw_store(self, req: dht_pb2.StoreRequest) -> str:
        try:
            reply = await self.a.p2p.call_protobuf_handler(self.a.peer, STORE, req, dht_pb2.StoreResponse)
        except Exception as e:
            return f"clear:store failed: {e!r}"
        return "accepted" if any(reply.store_ok) else "clear:refused"

    async def forge(self, how: int) -> str:
        block = self.a.rng.randrange(self.num_blocks)
        subkey, value, expiration = self.original[block]
        key = self.key(block)
        record = {
            "record_version": 1, "state": "online", "start": 0, "end": self.num_blocks, "throughput": 1e9,
            "dtype": "float32", "quant": "none", "cache_tokens_left": 10**9, "max_length": 10**6, "version": "evil",
        }  # fmt: skip
        if how == 0:  # the peer's subkey, our value, no signature
            forged = MSGPackSerializer.dumps(record)
        elif how == 1:  # the peer's subkey, our value signed with our key
            forged = self.signer.sign_value(DHTRecord(key, subkey, MSGPackSerializer.dumps(record), expiration + 30))
        elif how == 2:  # the peer's subkey and signature, another value
            forged = value.replace(b"online", b"offline") if b"online" in value else value + b"x"
        else:  # the peer's signature moved to our own subkey
            subkey = MSGPackSerializer.dumps(self.signer.local_public_key)
            forged = value
        ok = await self.store(key, subkey, forged, expiration + 30)
        self.forged_accepted += ok
        return "accepted" if ok else "clear:refused"

    async def replay(self, how: int) -> str:
        block = self.a.rng.randrange(self.num_blocks)
        subkey, value, expiration = self.original[block]
        # 0: the peer's own signed record, with a later expiration; 1: under another block's key
        key = self.key(block) if how == 0 else self.key((block + 1) % self.num_blocks)
        ok = await self.store(key, subkey, value, expiration + 60)
        self.forged_accepted += ok
        return "accepted" if ok else "clear:refused"

    async def bad_schema(self, i: int) -> str:
        key = self.key(i % self.num_blocks)
        subkey = MSGPackSerializer.dumps(self.signer.local_public_key)
        value = MSGPackSerializer.dumps({"state": "online", "start": "zero", "evil": True})
        expiration = get_dht_time() + 60
        signed = self.signer.sign_value(DHTRecord(key, subkey, value, expiration))
        ok = await self.store(key, subkey, signed, expiration)
        self.forged_accepted += ok
        return "accepted" if ok else "clear:refused"

    async def flood(self, i: int, big: bool) -> str:
        key = DHTID.generate(source=f"junk-{i // 50}").to_bytes()
        value = MSGPackSerializer.dumps(b"x" * (1 << 20) if big else f"junk {i}")
        subkey = MSGPackSerializer.dumps(f"subkey-{i}")
        self.flood_tried += 1
        try:
            ok = await self.store(key, subkey, value, get_dht_time() + 300)
        except Exception as e:
            return f"clear:store failed: {e!r}"
        self.flood_accepted += ok
        return "accepted" if ok else "clear:refused by the storage budget"


# ---- the honest client ----


class Honest(threading.Thread):
    """Greedy generation in one long inference session (rewound for each round), each step timed; every round's
    tokens are compared with local transformers' generate."""

    def __init__(self, ckpt: Path, initial_peers: list[str]):
        super().__init__(daemon=True)
        self.ckpt, self.initial_peers = ckpt, initial_peers
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.latencies: list[float] = []
        self.rounds = self.mismatches = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:
            self.errors.append(repr(e))
        finally:
            self.ready.set()

    def _run(self) -> None:
        from transformers import AutoModelForCausalLM

        from swarm import AutoDistributedModelForCausalLM

        ids = torch.randint(3, 500, (1, HONEST_PROMPT_TOKENS), generator=torch.Generator().manual_seed(7))
        local = AutoModelForCausalLM.from_pretrained(self.ckpt, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = local.generate(ids, max_new_tokens=HONEST_NEW_TOKENS, do_sample=False)[0, ids.shape[1] :]
        model = AutoDistributedModelForCausalLM.from_pretrained(self.ckpt, initial_peers=self.initial_peers)
        try:
            with (
                torch.no_grad(),
                model.inference_session(max_length=HONEST_PROMPT_TOKENS + HONEST_NEW_TOKENS) as session,
            ):
                self.ready.set()
                while not self.stop.is_set():
                    session.rewind(0)
                    tokens = []
                    x = ids
                    for _ in range(HONEST_NEW_TOKENS):
                        began = time.perf_counter()
                        out = session.step(model.model.embed_tokens(x))
                        self.latencies.append(time.perf_counter() - began)
                        logits = model.lm_head(model.model.norm(out[:, -1:]))
                        x = logits.argmax(-1)
                        tokens.append(int(x))
                    self.rounds += 1
                    self.mismatches += tokens != expected.tolist()
        finally:
            model.shutdown()


# ---- running it ----


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isascii() and entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children[int(fields[1])].append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_kib(pid: int, field_name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


class RssWatch:
    """Peak RSS of the peer's process tree (peer, its DHT process, the libp2p daemon), summed, sampled."""

    def __init__(self, root: int):
        self.root, self.peak_kib = root, 0
        self.peaks: dict[str, int] = {}

    def sample(self) -> None:
        total = 0
        for pid in process_tree(self.root):
            total += memory_kib(pid, "VmRSS")
            try:
                name = "peer" if pid == self.root else Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            label = f"{name} {pid}"
            self.peaks[label] = max(self.peaks.get(label, 0), memory_kib(pid, "VmHWM"))
        self.peak_kib = max(self.peak_kib, total)


async def attack(swarm: LocalSwarm, messages: int, seed: int, concurrency: int, honest: Honest) -> dict:
    peer_info = swarm.peers[0].info
    peer = PeerID.from_base58(peer_info["peer_id"])
    p2ps = [await P2P.create(initial_peers=peer_info["maddrs"]) for _ in range(2)]
    a = Attacker(p2ps, peer, random.Random(seed))
    info = await a.info()
    span, h = (info.start, info.end), _hidden_size(swarm)
    dht = DhtAttack(a, info.dht_prefix, info.end)
    for block, entries in (await dht.snapshot()).items():
        subkey, (value, expiration) = next(iter(entries.items()))
        dht.original[block] = (MSGPackSerializer.dumps(subkey), value, expiration)
    pushes = PushTarget(a, span, h)
    await pushes.ensure_open()  # before session floods could fill the peer's sessions

    def malformed() -> list[Case]:  # built again for each pass: fresh random data
        return (
            frame_cases(a, span, h) + forward_cases(a, span, h) + size_cases(a, span, h) + type_cases(a, span, h)
            + session_misuse_cases(a, span, h) + pushes.cases() + backward_cases(a, span, h)
        )  # fmt: skip

    floods = max(2 * DHT_MAX_SENDER_VALUES, messages // 20)  # beyond one sender's budget
    cases = dht.cases(floods) + abuse_cases(a, span, h, max(40, messages // 50))
    cases += malformed()  # every kind at least once
    while len(cases) < messages:
        batch = malformed()
        cases += batch[: messages - len(cases)] if len(cases) + len(batch) > messages else batch
    a.rng.shuffle(cases)

    tally = Tally()
    watch = RssWatch(swarm.peers[0].process.pid)
    queue: asyncio.Queue = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)
    crashed = False
    slowest: list[tuple[float, str]] = []  # (seconds until the answer, case): the ten slowest kept

    async def worker() -> None:
        nonlocal crashed
        while not queue.empty() and not crashed:
            case = queue.get_nowait()
            started = time.monotonic()
            try:
                outcome = await case.run()
            except Exception as e:  # a fault of this script, not of the peer: reported apart
                outcome = f"error:{e!r}"
            tally.add(case, outcome)
            slowest.append((time.monotonic() - started, f"{case.category}/{case.name}: {outcome[:80]}"))
            if len(slowest) > 40:
                slowest.sort(reverse=True)
                del slowest[10:]
            if swarm.peers[0].process.poll() is not None:
                crashed = True

    async def sampler() -> None:
        while True:
            watch.sample()
            await asyncio.sleep(0.5)

    began = time.monotonic()
    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.monotonic() - began
    held_streams = len(a.held)
    await a.close_held()
    sampling.cancel()
    watch.sample()

    alive = swarm.peers[0].process.poll() is None
    final = await a.info() if alive else None
    after = await dht.snapshot() if alive else {}
    intact = all(
        any(MSGPackSerializer.dumps(k) == dht.original[b][0] for k in after.get(b, {})) for b in dht.original
    ) and not any(k == dht.signer.local_public_key for entries in after.values() for k in entries)
    for p2p in p2ps:
        await p2p.shutdown()

    totals: Counter = Counter()
    for counts in tally.outcomes.values():
        totals.update(counts)
    log = swarm.peers[0].log_file.read_text(errors="replace")
    return {
        "tried": len(cases),
        "duration_s": round(duration, 1),
        "clear_errors": totals["clear"],
        "internal_errors": totals["internal"],
        "peer_internal_errors": None if final is None else int(final.stats.get("internal_errors", -1)),
        "log_tracebacks": log.count("Traceback (most recent call last)"),
        "accepted_malformed": totals["accepted_malformed"],
        "accepted_abusive": totals["accepted"],
        "closed_without_answer": totals["closed"],
        "timeouts": totals["timeout"],
        "sessions_ended_by_bad_push": totals["session_ended"],
        "harness_errors": totals["error"],
        "crashes": 0 if alive else 1,
        "peer_exit_code": swarm.peers[0].process.poll(),
        "held_streams_at_end": held_streams,
        "peak_rss_mib": round(watch.peak_kib / 1024, 1),
        "peak_rss_mib_by_process": {k: round(v / 1024, 1) for k, v in sorted(watch.peaks.items())},
        "bad_pushes_into_session": pushes.into_session,
        "peer_refused_pushes": None if final is None else final.stats.get("refused_pushes"),
        "dht": {
            "forged_or_replayed_accepted": dht.forged_accepted,
            "flood_tried": dht.flood_tried,
            "flood_accepted": dht.flood_accepted,
            "per_sender_limit": DHT_MAX_SENDER_VALUES,
            "records_intact": intact,
        },
        "categories": {cat: dict(sorted(c.items())) for cat, c in sorted(tally.outcomes.items())},
        "examples": dict(tally.examples),
        "slowest_answers_s": {what: round(s, 2) for s, what in sorted(slowest, reverse=True)[:10]},
    }


def _hidden_size(swarm: LocalSwarm) -> int:
    return int(json.loads((Path(swarm.model) / "config.json").read_text())["hidden_size"])


def run_fuzz(
    ckpt: Path | None = None, messages: int = 10000, seed: int = 0, concurrency: int = 8, workdir: Path | None = None
) -> dict:
    """Start the peer and the honest client, attack, stop everything; the JSON-able report."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="blockswarm-fuzz-"))
    if ckpt is None:
        ckpt = make_random_checkpoint(workdir / "tiny-llama", "llama", seed=1)
    config = json.loads((Path(ckpt) / "config.json").read_text())
    swarm = LocalSwarm(ckpt, peers=1, spans=[(0, int(config["num_hidden_layers"]))], extra_args=PEER_ARGS,
                       threads_per_peer=1, workdir=workdir)  # fmt: skip
    swarm.start()
    honest = Honest(Path(ckpt), swarm.initial_peers)
    try:
        honest.start()
        honest.ready.wait(300)
        report = asyncio.run(attack(swarm, messages, seed, concurrency, honest))
    finally:
        honest.stop.set()
        honest.join(120)
        codes = swarm.stop()
    lat = sorted(honest.latencies)
    report["honest"] = {
        "rounds": honest.rounds,
        "tokens_identical": honest.rounds > 0 and honest.mismatches == 0 and not honest.errors,
        "mismatched_rounds": honest.mismatches,
        "steps": len(lat),
        "step_latency_ms": {
            "p50": round(statistics.median(lat) * 1000, 2) if lat else None,
            "max": round(lat[-1] * 1000, 2) if lat else None,
        },
        "errors": honest.errors,
    }
    report["peer_exit_code_on_stop"] = codes[0]
    report["peer_log"] = str(swarm.peers[0].log_file)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint directory (default: a tiny random llama)")
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = run_fuzz(Path(args.model) if args.model else None, args.messages, args.seed, args.concurrency)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
