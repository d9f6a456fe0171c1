"""The client's side of the wire protocol: a background event loop and calls to peers over hivemind P2P.

User code is synchronous (``model.generate``); P2P is asyncio. One daemon thread runs the loop; a whole
generation step across every span of the route is one coroutine there, so each token costs one thread hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from peers.protocol import (
    BACKWARD_HANDLER,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    TRAIN_HANDLER,
    ProtocolError,
    RemoteError,
    check_push_token,
    decode_metadata,
    decode_tensor,
    make_request,
    receive_message,
    send_message,
)

T = TypeVar("T")


class PeerError(RuntimeError):
    """A call to one peer failed (it died, timed out, or answered with an error)."""

    def __init__(self, peer_id: PeerID, message: str):
        self.peer_id = peer_id
        super().__init__(f"peer {peer_id}: {message}")


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str = "blockswarm-client"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _check_output(response: runtime_pb2.ExpertResponse, like: torch.Tensor, max_numel: int) -> torch.Tensor:
    """A peer's answer is network input too: same shape and dtype as what we sent, finite."""
    if len(response.tensors) != 1:
        raise ProtocolError(f"expected 1 tensor in the answer, got {len(response.tensors)}")
    return _check_tensor(decode_tensor(response.tensors[0], max_numel=max_numel), like)


def _check_session_length(reply: dict[str, Any], expected: int) -> None:
    """After a step the peer reports how many tokens its cache holds: it must be where the client's session is."""
    held = reply.get("position")
    if held != expected:
        raise ProtocolError(f"the peer's cache holds {held!r} tokens after this step, the client's session {expected}")


def _check_tensor(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ProtocolError(f"answer has shape {list(out.shape)} {out.dtype}, expected {list(like.shape)} {like.dtype}")
    if not torch.isfinite(out).all():
        raise ProtocolError("answer contains NaN or infinite values")
    return out


class InferenceStream:
    """An open inference session with one peer for one span (async; used from the loop thread)."""

    def __init__(self, p2p: P2P, peer_id: PeerID, uid: str, max_bytes: int, timeout: float):
        self.p2p, self.peer_id, self.uid = p2p, peer_id, uid
        self.max_bytes, self.timeout = max_bytes, timeout
        self.max_numel = max_bytes // 2  # elements of the smallest wire dtype that fit in max_bytes
        self.last_rtt = 0.0  # network part of the last step's round trip (s)
        self.push_token: str | None = None  # lets the previous peer of a route push steps into this session
        self.trainables: dict[str, torch.Tensor] = {}  # deep prompts / LoRA of these blocks, sent at opening
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: asyncio.Task | None = None  # a reply being read (kept across a grace wait, never cancelled)

    async def open(
        self,
        max_length: int,
        batch: int,
        connect_timeout: float,
        trainables: dict[str, torch.Tensor] | None = None,
        lora_scale: float = 1.0,
    ) -> None:
        """Open the session; `trainables` (deep prompts / LoRA of these blocks) apply to all its steps."""
        trainables = trainables or {}
        meta: dict[str, Any] = {"max_length": max_length, "batch": batch}
        if trainables:
            meta.update(trainables_meta(trainables, lora_scale))
        try:
            _, self._reader, self._writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.peer_id, INFERENCE_HANDLER), connect_timeout
            )
            await send_message(make_request(list(trainables.values()), meta, uid=self.uid), self._writer)
            opened = decode_metadata((await self._receive(connect_timeout)).metadata)
            if opened.get("push_token") is not None:
                self.push_token = check_push_token(opened["push_token"])
        except Exception as e:
            await self.close()
            raise _as_peer_error(self.peer_id, e) from e

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self._writer is None:
            raise PeerError(self.peer_id, "the session with this peer is closed")
        try:
            began = time.perf_counter()
            await send_message(make_request([hidden], {"position": position}), self._writer)
            response = await self._receive(self.timeout)
            elapsed = time.perf_counter() - began
            output = _check_output(response, hidden, self.max_numel)
            reply = decode_metadata(response.metadata)
            _check_session_length(reply, position + hidden.shape[1])
            compute = reply.get("compute_s", 0.0)
            if not isinstance(compute, float) or not 0.0 <= compute <= elapsed:
                compute = 0.0  # a bad report only makes our latency estimate pessimistic
            self.last_rtt = elapsed - compute
            return output
        except BaseException as e:
            # After a timeout or a bad answer, a late or half-read reply could be taken for the next step's:
            # this stream is never used again.
            await self.close()
            if isinstance(e, Exception):
                raise _as_peer_error(self.peer_id, e) from e
            raise

    async def send(self, hidden: torch.Tensor, position: int, step: int, push: list[list[str]]) -> None:
        """Send step `step` (numbered, so a peer that also got it pushed computes it once), naming the peers its
        output should be pushed to next."""
        if self._writer is None:
            raise PeerError(self.peer_id, "the session with this peer is closed")
        try:
            await send_message(make_request([hidden], {"position": position, "step": step, "push": push}), self._writer)
        except BaseException as e:
            await self.close()
            if isinstance(e, Exception):
                raise _as_peer_error(self.peer_id, e) from e
            raise

    async def receive(
        self, step: int, like: torch.Tensor, position: int, grace: float | None = None
    ) -> torch.Tensor | None:
        """The output of step `step` (sent at `position`). With `grace`, returns None if it has not come within
        `grace` seconds; the reply keeps being read in the background and a later call gets it."""
        if self._writer is None:
            raise PeerError(self.peer_id, "the session with this peer is closed")
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive(self.timeout))
        if grace is not None:
            done, _ = await asyncio.wait({self._pending}, timeout=grace)
            if not done:
                return None
        task, self._pending = self._pending, None
        try:
            response = await task
            meta = decode_metadata(response.metadata)
            if meta.get("step") != step:
                raise ProtocolError(f"expected the answer to step {step}, got one to step {meta.get('step')!r}")
            _check_session_length(meta, position + like.shape[1])
            return _check_output(response, like, self.max_numel)
        except BaseException as e:
            await self.close()
            if isinstance(e, Exception):
                raise _as_peer_error(self.peer_id, e) from e
            raise

    async def _receive(self, timeout: float) -> runtime_pb2.ExpertResponse:
        async with asyncio.timeout(timeout):  # unlike wait_for, no extra task per step
            response = await receive_message(self._reader, runtime_pb2.ExpertResponse, max_bytes=self.max_bytes)
        if response is None:
            raise ConnectionError("the peer closed the session")
        return response

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def call_forward(
    p2p: P2P,
    peer_id: PeerID,
    uid: str,
    hidden: torch.Tensor,
    max_bytes: int,
    timeout: float,
    trainables: dict[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Whole-sequence forward of blocks `uid` ('start:end') on one peer, with optional deep prompts / LoRA tensors
    (see blocks.adapters)."""
    trainables = trainables or {}
    meta = trainables_meta(trainables, lora_scale) if trainables else {}
    (output,) = await _call_once(
        p2p, peer_id, FORWARD_HANDLER, uid, [hidden, *trainables.values()], meta, [hidden], max_bytes, timeout
    )
    return output


async def call_backward(
    p2p: P2P,
    peer_id: PeerID,
    uid: str,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    max_bytes: int,
    timeout: float,
    trainables: dict[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
) -> list[torch.Tensor]:
    """Gradients w.r.t. the span's input `hidden` and each of `trainables` (in order), given the gradient w.r.t. the
    span's output. The peer recomputes the forward: it keeps nothing between calls."""
    trainables = trainables or {}
    meta = trainables_meta(trainables, lora_scale)
    tensors = [hidden, grad_output, *trainables.values()]
    return await _call_once(
        p2p, peer_id, BACKWARD_HANDLER, uid, tensors, meta, [hidden, *trainables.values()], max_bytes, timeout
    )


async def _call_once(
    p2p: P2P,
    peer_id: PeerID,
    handler: str,
    uid: str,
    tensors: list[torch.Tensor],
    meta: dict[str, Any],
    expected: list[torch.Tensor],
    max_bytes: int,
    timeout: float,
) -> list[torch.Tensor]:
    """One request on a fresh stream -> the answer's tensors, each checked to be shaped like `expected`."""
    writer = None
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, handler), timeout)
        try:
            await send_message(make_request(tensors, meta, uid=uid), writer)
        except ConnectionError:
            pass  # the peer may have refused the request mid-way: its error is still waiting to be read
        response = await asyncio.wait_for(
            receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=max_bytes), timeout
        )
        if response is None:
            raise ConnectionError("the peer closed the stream without answering")
        if len(response.tensors) != len(expected):
            raise ProtocolError(f"expected {len(expected)} tensors in the answer, got {len(response.tensors)}")
        return [
            _check_tensor(decode_tensor(t, max_numel=max_bytes // 2), like)
            for t, like in zip(response.tensors, expected, strict=True)
        ]
    except Exception as e:
        raise _as_peer_error(peer_id, e) from e
    finally:
        if writer is not None:
            writer.close()


class TrainCall:
    """A forward whose backward follows on the same stream, the peer holding the autograd graph in between (see
    the peer's train handler). If the peer would not hold it (`held` is False after `forward`), the stream is
    closed and the stateless backward call is the way to get gradients."""

    def __init__(self, p2p: P2P, peer_id: PeerID, uid: str, max_bytes: int, timeout: float):
        self.p2p, self.peer_id, self.uid, self.max_bytes, self.timeout = p2p, peer_id, uid, max_bytes, timeout
        self.held = False
        self.like: list[torch.Tensor] = []  # what the backward's answers must look like
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def forward(
        self, hidden: torch.Tensor, trainables: dict[str, torch.Tensor], lora_scale: float
    ) -> torch.Tensor:
        try:
            self._loop = asyncio.get_running_loop()
            _, self._reader, self._writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.peer_id, TRAIN_HANDLER), self.timeout
            )
            meta = trainables_meta(trainables, lora_scale)
            await send_message(make_request([hidden, *trainables.values()], meta, uid=self.uid), self._writer)
            response = await self._receive()
            self.held = decode_metadata(response.metadata).get("held") is True
            output = _check_output(response, hidden, self.max_bytes // 2)
        except Exception as e:
            await self.close()
            raise _as_peer_error(self.peer_id, e) from e
        if not self.held:
            await self.close()
        self.like = [hidden, *trainables.values()]
        return output

    async def backward(self, grad_output: torch.Tensor) -> list[torch.Tensor]:
        """Gradients w.r.t. the forward's input and trainables, from the graph the peer held."""
        if self._writer is None:
            raise PeerError(self.peer_id, "this training call is closed")
        try:
            await send_message(make_request([grad_output], {}), self._writer)
            response = await self._receive()
            if len(response.tensors) != len(self.like):
                raise ProtocolError(f"expected {len(self.like)} tensors in the answer, got {len(response.tensors)}")
            return [
                _check_tensor(decode_tensor(t, max_numel=self.max_bytes // 2), like)
                for t, like in zip(response.tensors, self.like, strict=True)
            ]
        except Exception as e:
            raise _as_peer_error(self.peer_id, e) from e
        finally:
            await self.close()

    async def _receive(self) -> runtime_pb2.ExpertResponse:
        async with asyncio.timeout(self.timeout):
            response = await receive_message(self._reader, runtime_pb2.ExpertResponse, max_bytes=self.max_bytes)
        if response is None:
            raise ConnectionError("the peer closed the stream without answering")
        return response

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __del__(self) -> None:
        # The autograd graph was dropped without a backward: let the peer free what it holds now, not at its timeout.
        writer, loop = self._writer, self._loop
        if writer is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(writer.close)


async def call_info(p2p: P2P, peer_id: PeerID, timeout: float) -> dict[str, Any]:
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer_id, INFO_HANDLER, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo),
            timeout,
        )
        return decode_metadata(response.serialized_info)
    except Exception as e:
        raise _as_peer_error(peer_id, e) from e


def trainables_meta(trainables: dict[str, torch.Tensor], lora_scale: float) -> dict[str, Any]:
    """Metadata naming the deep prompts / LoRA tensors sent after a request's fixed tensors (see blocks.adapters)."""
    return {"names": list(trainables), "lora_scale": lora_scale}


def _as_peer_error(peer_id: PeerID, e: BaseException) -> PeerError:
    if isinstance(e, PeerError):
        return e
    if isinstance(e, RemoteError):
        return PeerError(peer_id, f"refused the request: {e}")
    if isinstance(e, asyncio.TimeoutError):
        return PeerError(peer_id, "timed out")
    if isinstance(e, ProtocolError):
        return PeerError(peer_id, f"sent an invalid answer: {e}")
    return PeerError(peer_id, f"{type(e).__name__}: {e}")
