"""A client inference session: one open stream per span of the route, each holding that span's KV cache."""

from __future__ import annotations

import asyncio
import logging

import torch

from swarm.routing import RouteSpan
from swarm.sequence import RemoteSequence
from swarm.transport import InferenceStream

logger = logging.getLogger(__name__)


class SessionClosedError(RuntimeError):
    pass


class InferenceSession:
    """Runs successive chunks of tokens through every block, keeping the caches on the peers.

    `position` is the number of tokens already processed; a step may also start at an earlier position (the peers
    crop their caches to it). A failed step closes the session: its caches can no longer be trusted.
    """

    def __init__(self, sequence: RemoteSequence, max_length: int, batch: int = 1):
        if max_length < 1 or batch < 1:
            raise ValueError(f"max_length and batch must be >= 1, got {max_length} and {batch}")
        self.sequence, self.max_length, self.batch = sequence, max_length, batch
        self.position = 0
        self.route: list[RouteSpan] = []
        self._streams: list[InferenceStream] = []
        self._closed = False
        self.token_ids: torch.Tensor | None = None  # tokens of the session so far (set by the model)

    def open(self) -> InferenceSession:
        self.route = self.sequence.make_route(min_length=self.max_length)
        cfg = self.sequence.config
        self._streams = [
            InferenceStream(self.sequence.p2p, span.peer_id, span.uid, cfg.max_message_bytes, cfg.request_timeout)
            for span in self.route
        ]
        try:
            self.sequence.loop.run(self._open_all())
        except BaseException:
            self.close()
            raise
        return self

    async def _open_all(self) -> None:
        cfg = self.sequence.config
        results = await asyncio.gather(
            *(s.open(self.max_length, self.batch, cfg.connect_timeout) for s in self._streams), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # Close the streams that did open, so those peers release the cache they reserved for us now.
            await self._close_all()
            raise errors[0]

    def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Process hidden [batch, new_tokens, hidden_size] at `position` (default: the current end)."""
        if self._closed:
            raise SessionClosedError("this inference session is closed")
        position = self.position if position is None else position
        if hidden.ndim != 3 or hidden.shape[0] != self.batch:
            raise ValueError(f"expected hidden states [batch={self.batch}, tokens, hidden], got {list(hidden.shape)}")
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside the session's {self.position} tokens")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"the session was opened with max_length={self.max_length}, but this step would reach "
                f"{position + hidden.shape[1]} tokens"
            )
        chunk = self.sequence.config.max_prefill_tokens
        outputs = []
        try:
            for offset in range(0, hidden.shape[1], chunk):
                piece = hidden[:, offset : offset + chunk].to(self.sequence.config.wire_dtype)
                outputs.append(self.sequence.loop.run(self._step_all(piece, position + offset)))
        except BaseException:
            self.close()  # the peers' caches may disagree now (re-routing with replay comes with failover)
            raise
        self.position = position + hidden.shape[1]
        return torch.cat(outputs, dim=1).to(hidden.dtype)

    async def _step_all(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        for stream in self._streams:
            hidden = await stream.step(hidden, position)
        return hidden

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._streams:
            try:
                self.sequence.loop.run(self._close_all(), timeout=5)
            except Exception:
                logger.debug("error while closing session streams", exc_info=True)

    async def _close_all(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams))

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
