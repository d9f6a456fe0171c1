"""Every message of the protocol, defined once as a typed value with its encoding and its validation.

Both sides use only these classes: a client builds a request and ``encode()``s it; a peer ``decode()``s it against
its limits (each untrusted field checked by explicit code; a failure is a ProtocolError naming the field); the
peer answers with a reply value that the client decodes against what it sent. Requests are hivemind
``ExpertRequest`` protobufs (uid, tensors, msgpack metadata), replies ``ExpertResponse``. docs/protocol.md
describes the exchanges; this module is their specification.

Handlers and their exchanges (each a stream; "->" client to peer, "<-" peer to client):

- inference: -> OpenSession, <- SessionOpened, then any number of -> Step / <- StepReply. A Step may instead come
  from the previous peer of the route, pushed on the push handler (uid = the session's push token). If the client
  asked for it (OpenSession.direct) and the peer offers one (SessionOpened.direct, a DirectOffer), the client may
  move the session's steps and replies to a direct TLS connection (peers.direct): there -> Attach, <- Attached,
  then -> Step / <- StepReply; the stream stays open (closing it ends the session; error frames come on it).
- forward: -> Forward, <- ForwardReply.
- backward: -> Backward, <- Gradients (the peer recomputes the forward; nothing is kept between calls).
- train: -> Forward, <- ForwardReply(held=...), then, if held, -> GradOutput, <- Gradients (from the held graph).
- info (a unary protobuf call): <- PeerInfo.

A refused request is answered with an error frame (hivemind's RPCError, a message only) naming the problem. One
over a size limit of the peer (max_batch, max_length, max_forward_tokens, max_backward_tokens) is a LimitExceeded
(framing): its message begins ``limit exceeded: <setting>=<limit>, requested <size>``, which the client reads back
as an error of the request, not a failure of the peer. Peers announce those limits in their DHT records, and
clients cut their batches to them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from blocks.adapters import Adapters
from peers.wire.codec import (
    WIRE_DTYPES,
    all_finite,
    decode_metadata,
    decode_tensor,
    encode_metadata,
    encode_tensor,
    get_bool,
    get_float,
    get_hex_token,
    get_int,
)
from peers.wire.framing import ProtocolError
from peers.wire.validation import (
    Limits,
    check_adapters,
    check_backward_size,
    check_forward_size,
    check_hidden,
    check_lora_scale,
    check_session_size,
    parse_span_uid,
)

PROTOCOL_VERSION = 2
INFERENCE_HANDLER = "blockswarm.v2.inference"
FORWARD_HANDLER = "blockswarm.v2.forward"
BACKWARD_HANDLER = "blockswarm.v2.backward"
TRAIN_HANDLER = "blockswarm.v2.train"
INFO_HANDLER = "blockswarm.v2.info"
PUSH_HANDLER = "blockswarm.v2.push"  # peer-to-peer: a step's output pushed straight into the next peer's session
MAX_PUSH_HOPS = 256  # longest chain of next peers one step may name
PUSH_TOKEN_LENGTH = 32
DIRECT_TICKET_LENGTH = 64  # hex characters: 256 random bits
CERT_SHA256_LENGTH = 64
MAX_DIRECT_HOSTS = 8
MAX_COMPUTE_SECONDS = 86400.0

LinearShape = Callable[[int, str], tuple[int, int]]  # (block, module) -> (in_features, out_features)


class _Key:
    """Metadata keys, each spelled once."""

    VERSION = "version"
    MAX_LENGTH = "max_length"
    BATCH = "batch"
    SESSION_ID = "session_id"
    PUSH_TOKEN = "push_token"
    POSITION = "position"
    STEP = "step"
    PUSH = "push"
    COMPUTE_S = "compute_s"
    HELD = "held"
    ADAPTERS = "adapters"
    LORA_SCALE = "lora_scale"
    DIRECT = "direct"
    TICKET = "ticket"


def span_uid(start: int, end: int) -> str:
    return f"{start}:{end}"


def _request(uid: str, tensors: list[torch.Tensor], meta: dict[str, Any]) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        uid=uid, tensors=[encode_tensor(t) for t in tensors], metadata=encode_metadata(meta)
    )


def _response(tensors: list, meta: dict[str, Any]) -> runtime_pb2.ExpertResponse:
    """`tensors` may hold already encoded tensors (a step's output is encoded once for the push and the reply)."""
    encoded = [t if isinstance(t, runtime_pb2.Tensor) else encode_tensor(t) for t in tensors]
    return runtime_pb2.ExpertResponse(tensors=encoded, metadata=encode_metadata(meta))


def _count(proto, expected: int, what: str) -> None:
    if len(proto.tensors) != expected:
        raise ProtocolError(f"expected {expected} tensor(s) ({what}), got {len(proto.tensors)}")


def _adapters_meta(adapters: Adapters) -> dict[str, Any]:
    return {_Key.ADAPTERS: list(adapters.names), _Key.LORA_SCALE: adapters.lora_scale} if adapters else {}


def _decode_adapters(
    proto: runtime_pb2.ExpertRequest,
    meta: dict[str, Any],
    fixed: int,
    like: torch.Tensor,
    start: int,
    end: int,
    limits: Limits,
    linear_shape: LinearShape,
) -> Adapters:
    """The adapter tensors that follow the request's `fixed` tensors, named in metadata, checked for this span."""
    names = meta.get(_Key.ADAPTERS, [])
    tensors = [decode_tensor(t, max_numel=limits.max_numel) for t in proto.tensors[fixed:]]
    checked = check_adapters(names, tensors, like, start, end, limits, linear_shape)
    return Adapters(checked, check_lora_scale(meta.get(_Key.LORA_SCALE, 1.0)), first_block=start)


def _check_reply_tensor(out: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    """A peer's answer is network input too: shaped like what we sent, finite."""
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ProtocolError(f"{what} has shape {list(out.shape)} {out.dtype}, expected {list(like.shape)} {like.dtype}")
    if not all_finite(out):
        raise ProtocolError(f"{what} contains NaN or infinite values")
    return out


def _reply_tensor(proto: runtime_pb2.ExpertResponse, index: int, like: torch.Tensor, what: str) -> torch.Tensor:
    max_numel = max(like.numel(), 1)  # exactly what is expected, before the buffer is touched
    return _check_reply_tensor(decode_tensor(proto.tensors[index], max_numel=max_numel), like, what)


# ---- inference sessions ----


@dataclass(frozen=True)
class OpenSession:
    """First frame of an inference stream: blocks [start, end), room for batch x max_length tokens, and adapters
    applied to every step of the session."""

    start: int
    end: int
    max_length: int
    batch: int
    adapters: Adapters = field(default_factory=Adapters)
    version: int = PROTOCOL_VERSION
    direct: bool = False  # the client would take a DirectOffer for this session

    def encode(self) -> runtime_pb2.ExpertRequest:
        meta = {_Key.VERSION: self.version, _Key.MAX_LENGTH: self.max_length, _Key.BATCH: self.batch}
        if self.direct:
            meta[_Key.DIRECT] = True
        return _request(span_uid(self.start, self.end), self.adapters.values, meta | _adapters_meta(self.adapters))

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest, limits: Limits, linear_shape: LinearShape) -> OpenSession:
        meta = decode_metadata(proto.metadata)
        version = get_int(meta, _Key.VERSION, low=0, high=2**31, default=1)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} is not supported: this peer speaks {PROTOCOL_VERSION}")
        start, end = parse_span_uid(proto.uid, limits)
        max_length = get_int(meta, _Key.MAX_LENGTH, low=1, high=2**31)
        batch = get_int(meta, _Key.BATCH, low=1, high=2**31)
        check_session_size(batch, max_length, limits)
        # Shapes only: adapters are checked against a session of batch x max_length tokens.
        dtype = proto.tensors[0].dtype if proto.tensors else "float32"
        # (an unknown dtype name is refused with a clear error when the tensors are decoded)
        like = torch.empty(
            batch, max_length, limits.hidden_size, dtype=WIRE_DTYPES.get(dtype, torch.float32), device="meta"
        )
        adapters = _decode_adapters(proto, meta, 0, like, start, end, limits, linear_shape)
        return cls(start, end, max_length, batch, adapters, version, get_bool(meta, _Key.DIRECT, default=False))


@dataclass(frozen=True)
class DirectOffer:
    """How the client may reach its session over a direct TLS connection to the peer (peers.direct): the hosts
    (IP addresses) and port of the peer's listener, the SHA-256 of the listener's certificate (the client accepts
    no other) and a one-time ticket naming the session. It travels inside the libp2p stream, which is encrypted and
    authenticated by peer ID: whoever presents the ticket over TLS to a server holding that certificate is the
    client that opened the session, talking to the peer that answered it."""

    hosts: tuple[str, ...]
    port: int
    cert_sha256: str
    ticket: str

    def to_meta(self) -> list[Any]:
        return [list(self.hosts), self.port, self.cert_sha256, self.ticket]

    @classmethod
    def from_meta(cls, value: Any) -> DirectOffer:
        if not (isinstance(value, list) and len(value) == 4):
            raise ProtocolError(f"metadata field {_Key.DIRECT!r} must be [hosts, port, cert_sha256, ticket]")
        hosts, port, cert, ticket = value
        if not (isinstance(hosts, list) and 0 < len(hosts) <= MAX_DIRECT_HOSTS):
            raise ProtocolError(f"a direct offer names 1 to {MAX_DIRECT_HOSTS} hosts")
        for host in hosts:
            if not (isinstance(host, str) and len(host) <= 64 and _is_ip(host)):
                raise ProtocolError(f"a direct offer's host must be an IP address, got {host!r:.80}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ProtocolError(f"a direct offer's port must be in [1, 65535], got {port!r:.80}")
        if not _is_hex(cert, CERT_SHA256_LENGTH):
            raise ProtocolError(f"a direct offer's cert_sha256 must be {CERT_SHA256_LENGTH} lowercase hex characters")
        if not _is_hex(ticket, DIRECT_TICKET_LENGTH):
            raise ProtocolError(f"a direct offer's ticket must be {DIRECT_TICKET_LENGTH} lowercase hex characters")
        return cls(tuple(hosts), port, cert, ticket)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class SessionOpened:
    session_id: int
    push_token: str  # a capability: only peers the client names can push into this session
    version: int = PROTOCOL_VERSION
    direct: DirectOffer | None = None  # only to a client that asked (OpenSession.direct)

    def encode(self) -> runtime_pb2.ExpertResponse:
        meta = {_Key.VERSION: self.version, _Key.SESSION_ID: self.session_id, _Key.PUSH_TOKEN: self.push_token}
        if self.direct is not None:
            meta[_Key.DIRECT] = self.direct.to_meta()
        return _response([], meta)

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertResponse) -> SessionOpened:
        meta = decode_metadata(proto.metadata)
        version = get_int(meta, _Key.VERSION, low=0, high=2**31)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"the peer speaks protocol version {version}, this client {PROTOCOL_VERSION}")
        session_id = get_int(meta, _Key.SESSION_ID, low=0, high=2**63)
        push_token = get_hex_token(meta, _Key.PUSH_TOKEN, length=PUSH_TOKEN_LENGTH)
        offer = meta.get(_Key.DIRECT)
        return cls(session_id, push_token, version, None if offer is None else DirectOffer.from_meta(offer))


@dataclass(frozen=True)
class Attach:
    """First frame on a direct connection: the ticket of a DirectOffer. The peer closes a connection whose first
    frame is anything else, or a ticket it does not hold (each is good once, while its session lasts)."""

    ticket: str

    def encode(self) -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(metadata=encode_metadata({_Key.TICKET: self.ticket}))

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest) -> Attach:
        return cls(get_hex_token(decode_metadata(proto.metadata), _Key.TICKET, length=DIRECT_TICKET_LENGTH))


@dataclass(frozen=True)
class Attached:
    """The peer's answer to Attach: from now on this session's steps and replies use the direct connection."""

    session_id: int

    def encode(self) -> runtime_pb2.ExpertResponse:
        return _response([], {_Key.SESSION_ID: self.session_id})

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertResponse, session_id: int) -> Attached:
        got = get_int(decode_metadata(proto.metadata), _Key.SESSION_ID, low=0, high=2**63)
        if got != session_id:
            raise ProtocolError(f"the direct connection attached session {got}, not this session {session_id}")
        return cls(got)


@dataclass(frozen=True)
class Step:
    """Tokens [position, position + T) of a session's hidden states. `step` numbers a client's steps so that a peer
    computes a step only once when it arrives both pushed and from the client; `push` names the peers (base58 ID,
    push token) that the output goes to next, in order."""

    hidden: torch.Tensor
    position: int
    step: int | None = None
    push: tuple[tuple[str, str], ...] = ()

    def encode(self, uid: str = "") -> runtime_pb2.ExpertRequest:
        meta: dict[str, Any] = {_Key.POSITION: self.position}
        if self.step is not None:
            meta[_Key.STEP] = self.step
        if self.push:
            meta[_Key.PUSH] = [list(hop) for hop in self.push]
        return _request(uid, [self.hidden], meta)

    def encoded_forward(self, output: runtime_pb2.Tensor, uid: str) -> runtime_pb2.ExpertRequest:
        """This step's output, already encoded, as the next peer's step (pushed to session `uid`)."""
        meta: dict[str, Any] = {_Key.POSITION: self.position, _Key.STEP: self.step}
        meta[_Key.PUSH] = [list(hop) for hop in self.push[1:]]
        return runtime_pb2.ExpertRequest(uid=uid, tensors=[output], metadata=encode_metadata(meta))

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest, limits: Limits, batch: int, max_length: int) -> Step:
        meta = decode_metadata(proto.metadata)
        _count(proto, 1, "hidden states")
        hidden = check_hidden(decode_tensor(proto.tensors[0], max_numel=limits.max_numel), limits, batch=batch)
        position = get_int(meta, _Key.POSITION, low=0, high=max_length)
        step = None if meta.get(_Key.STEP) is None else get_int(meta, _Key.STEP, low=0, high=2**62)
        return cls(hidden, position, step, _decode_push(meta.get(_Key.PUSH, [])))


def _decode_push(chain: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(chain, list) or len(chain) > MAX_PUSH_HOPS:
        raise ProtocolError(f"metadata field 'push' must be a list of at most {MAX_PUSH_HOPS} [peer, token] pairs")
    hops = []
    for hop in chain:
        if not (isinstance(hop, list) and len(hop) == 2 and isinstance(hop[0], str) and 0 < len(hop[0]) <= 128):
            raise ProtocolError("each 'push' hop must be [peer ID, push token]")
        if not _is_push_token(hop[1]):
            raise ProtocolError(f"each 'push' hop's push token must be {PUSH_TOKEN_LENGTH} lowercase hex characters")
        hops.append((hop[0], hop[1]))
    return tuple(hops)


def _is_push_token(value: Any) -> bool:
    return _is_hex(value, PUSH_TOKEN_LENGTH)


@dataclass(frozen=True)
class StepReply:
    """A step's output, with the number of tokens the peer's cache holds after it (the client checks it against
    its own session) and the peer's compute time (lets the client tell network latency from compute)."""

    hidden: torch.Tensor | runtime_pb2.Tensor
    position: int
    compute_s: float
    step: int | None = None

    def encode(self) -> runtime_pb2.ExpertResponse:
        meta = {_Key.POSITION: self.position, _Key.COMPUTE_S: self.compute_s, _Key.STEP: self.step}
        return _response([self.hidden], meta)

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertResponse, sent: Step) -> StepReply:
        """Checked against the step it answers: same shape and dtype, the step's number, the session's length."""
        meta = decode_metadata(proto.metadata)
        _count(proto, 1, "output hidden states")
        step = None if meta.get(_Key.STEP) is None else get_int(meta, _Key.STEP, low=0, high=2**62)
        if step != sent.step:
            raise ProtocolError(f"expected the answer to step {sent.step}, got one to step {step!r}")
        expected = sent.position + sent.hidden.shape[1]
        position = meta.get(_Key.POSITION)
        if position != expected:
            raise ProtocolError(f"the peer's cache holds {position!r} tokens after this step, the client's {expected}")
        compute_s = get_float(meta, _Key.COMPUTE_S, low=0.0, high=MAX_COMPUTE_SECONDS, default=0.0)
        return cls(_reply_tensor(proto, 0, sent.hidden, "the step's output"), expected, compute_s, step)


# ---- whole-sequence forward, backward and training ----


@dataclass(frozen=True)
class Forward:
    """Blocks [start, end) on whole sequences, with adapters (forward handler, and the train handler's first frame)."""

    start: int
    end: int
    hidden: torch.Tensor
    adapters: Adapters = field(default_factory=Adapters)

    def encode(self) -> runtime_pb2.ExpertRequest:
        meta = _adapters_meta(self.adapters)
        return _request(span_uid(self.start, self.end), [self.hidden, *self.adapters.values], meta)

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest, limits: Limits, linear_shape: LinearShape) -> Forward:
        start, end = parse_span_uid(proto.uid, limits)
        meta = decode_metadata(proto.metadata)
        if not proto.tensors:
            raise ProtocolError("expected the hidden states as the first tensor")
        hidden = check_hidden(decode_tensor(proto.tensors[0], max_numel=limits.max_numel), limits)
        check_forward_size(hidden, limits)
        return cls(start, end, hidden, _decode_adapters(proto, meta, 1, hidden, start, end, limits, linear_shape))


@dataclass(frozen=True)
class ForwardReply:
    """A forward's output; on the train handler, `held` says whether the peer keeps the graph for a GradOutput."""

    hidden: torch.Tensor
    held: bool = False

    def encode(self) -> runtime_pb2.ExpertResponse:
        return _response([self.hidden], {_Key.HELD: self.held})

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertResponse, sent: Forward) -> ForwardReply:
        meta = decode_metadata(proto.metadata)
        _count(proto, 1, "output hidden states")
        return cls(_reply_tensor(proto, 0, sent.hidden, "the output"), get_bool(meta, _Key.HELD, default=False))


@dataclass(frozen=True)
class Backward:
    """Gradients of blocks [start, end) given their input and the gradient w.r.t. their output (stateless)."""

    start: int
    end: int
    hidden: torch.Tensor
    grad_output: torch.Tensor
    adapters: Adapters = field(default_factory=Adapters)

    def encode(self) -> runtime_pb2.ExpertRequest:
        tensors = [self.hidden, self.grad_output, *self.adapters.values]
        return _request(span_uid(self.start, self.end), tensors, _adapters_meta(self.adapters))

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest, limits: Limits, linear_shape: LinearShape) -> Backward:
        start, end = parse_span_uid(proto.uid, limits)
        meta = decode_metadata(proto.metadata)
        if len(proto.tensors) < 2:
            raise ProtocolError("expected the hidden states and the output gradient as the first two tensors")
        hidden = check_hidden(decode_tensor(proto.tensors[0], max_numel=limits.max_numel), limits)
        grad = decode_tensor(proto.tensors[1], max_numel=limits.max_numel)
        check_backward_size(hidden, grad, limits)
        adapters = _decode_adapters(proto, meta, 2, hidden, start, end, limits, linear_shape)
        return cls(start, end, hidden, grad, adapters)


@dataclass(frozen=True)
class GradOutput:
    """The train handler's second frame: the gradient w.r.t. the held forward's output."""

    grad_output: torch.Tensor

    def encode(self) -> runtime_pb2.ExpertRequest:
        return _request("", [self.grad_output], {})

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertRequest, forward: Forward, limits: Limits) -> GradOutput:
        _count(proto, 1, "the output gradient")
        grad = decode_tensor(proto.tensors[0], max_numel=limits.max_numel)
        check_backward_size(forward.hidden, grad, limits)
        return cls(grad)


@dataclass(frozen=True)
class Gradients:
    """Gradients w.r.t. a backward's input hidden states and each of its adapter tensors (same names)."""

    grad_input: torch.Tensor
    adapters: Adapters = field(default_factory=Adapters)

    def encode(self) -> runtime_pb2.ExpertResponse:
        return _response([self.grad_input, *self.adapters.values], {})

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertResponse, hidden: torch.Tensor, adapters: Adapters) -> Gradients:
        """Checked against the request's input and adapters: one gradient each, shaped like it."""
        _count(proto, 1 + len(adapters.names), "gradients of the input and of each adapter tensor")
        grad_input = _reply_tensor(proto, 0, hidden, "the input's gradient")
        grads = {
            name: _reply_tensor(proto, 1 + i, like, f"the gradient of {name}")
            for i, (name, like) in enumerate(adapters.tensors.items())
        }
        return cls(grad_input, adapters.replace(grads))


# ---- info ----


@dataclass(frozen=True)
class PeerInfo:
    """What a peer says about itself on the info call: its span and settings (fixed while it serves them) and its
    current load and counters."""

    model: str
    dht_prefix: str
    start: int
    end: int
    dtype: str
    quant: str
    max_length: int
    max_batch: int
    version: str
    public_name: str | None
    weights: dict[str, Any]
    protocol_version: int = PROTOCOL_VERSION
    cache_tokens_left: int = 0
    sessions: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    block_tokens: dict[str, int] = field(default_factory=dict)
    batch_sessions: int = 0  # sessions in the last batched step
    queue_length: int = 0  # computations waiting for their turn

    def encode(self) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=encode_metadata(asdict(self)))

    @classmethod
    def decode(cls, proto: runtime_pb2.ExpertInfo) -> PeerInfo:
        meta = decode_metadata(proto.serialized_info)
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(meta) - names
        if unknown:
            raise ProtocolError(f"peer info has unknown fields {sorted(unknown)[:5]}")
        try:
            info = cls(**meta)
        except TypeError as e:
            raise ProtocolError(f"peer info is incomplete: {e}") from None
        ints = ("start", "end", "max_length", "max_batch", "sessions", "batch_sessions", "queue_length")
        for name, kind in ((name, int) for name in ints):
            if not isinstance(getattr(info, name), kind):
                raise ProtocolError(f"peer info field {name!r} must be {kind.__name__}")
        for name in ("weights", "stats", "block_tokens"):
            if not isinstance(getattr(info, name), dict):
                raise ProtocolError(f"peer info field {name!r} must be a map")
        return info
