"""A client inference session: one open stream per span of the route, each holding that span's KV cache."""

from __future__ import annotations

import asyncio
import logging
import secrets

import torch
from transformers.cache_utils import DynamicCache

from blocks.adapters import Adapters
from peers import trace
from peers.wire import Step
from privacy.exposure import ExposureLedger
from swarm.failover import Failover
from swarm.limits import judge_refusal
from swarm.routing import RouteSpan
from swarm.sequence import RemoteSequence
from swarm.spot_checks import gather_checks, raise_for
from swarm.transport import InferenceStream, PeerError
from swarm.verification import Evidence

logger = logging.getLogger(__name__)


class SessionClosedError(RuntimeError):
    pass


class InferenceSession:
    """Runs successive chunks of tokens through every block, keeping the caches on the peers.

    `position` is the number of tokens already processed; a step may also start at an earlier position (the peers
    crop their caches to it). The session remembers what it sent to each span; if a peer fails mid-session, its
    blocks are re-routed to other peers and they are sent that history first, so their caches match and the
    generation continues with exactly the same results.
    """

    def __init__(
        self,
        sequence: RemoteSequence,
        max_length: int,
        batch: int = 1,
        adapters: Adapters | None = None,
    ):
        if max_length < 1 or batch < 1:
            raise ValueError(f"max_length and batch must be >= 1, got {max_length} and {batch}")
        self.sequence, self.max_length, self.batch = sequence, max_length, batch
        # the client's deep prompts (from block 0) and LoRA, fixed for the session
        self.adapters = (adapters or Adapters()).detach().to(sequence.config.wire_dtype)
        self.position = 0
        self.route: list[RouteSpan] = []
        self._streams: list[InferenceStream] = []
        # per stream: every input it received, [batch, max_length, hidden] (valid up to `position`)
        self._history: list[torch.Tensor | None] = []
        self._closed = False
        self.failovers = 0
        self._step_number = 0  # numbers the steps sent with push chains
        self.token_ids: torch.Tensor | None = None  # tokens of the session so far (set by the model)
        self.ledger = ExposureLedger(session_id=secrets.token_hex(4))  # which peer saw which blocks' activations
        self.local_caches: dict[str, DynamicCache] = {}  # KV caches of the blocks the client runs itself

    @property
    def _tokens_needed(self) -> int:
        return self.batch * self.max_length  # the cache a peer reserves for this session

    def _new_stream(self, span: RouteSpan) -> InferenceStream:
        cfg = self.sequence.config
        return InferenceStream(
            self.sequence.p2p,
            span.peer_id,
            span.start,
            span.end,
            cfg.max_message_bytes,
            cfg.request_timeout,
            direct=cfg.direct,
        )

    def open(self) -> InferenceSession:
        """Open a stream to every peer of a route; a peer that fails to open is avoided and the route re-planned."""
        failover = Failover(self.sequence.health, self.sequence.config, "opening a session")

        def attempt(timeout: float | None) -> None:
            self.route = self.sequence.make_route(
                self.max_length, timeout=timeout, tokens_needed=self._tokens_needed, min_batch=self.batch
            )
            self._streams = [self._new_stream(span) for span in self.route]
            self._history = [None] * len(self._streams)
            try:
                self.sequence.loop.run(self._open_all(self._streams))
            except PeerError as e:
                # a refusal over a size limit the session really is over: the session's error, not the peer's
                judged = judge_refusal(e, self.batch, self.max_length, self.sequence.view.peer(e.peer_id))
                if judged is not e:
                    raise judged from e
                raise

        try:
            failover.run(attempt)
        except BaseException:
            self.close()
            raise
        return self

    async def _open_all(self, streams: list[InferenceStream]) -> None:
        cfg = self.sequence.config
        results = await asyncio.gather(
            *(
                s.open(self.max_length, self.batch, cfg.connect_timeout, self.adapters.select(s.start, s.end))
                for s in streams
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # Close the streams that did open, so those peers release the cache they reserved for us now.
            await asyncio.gather(*(s.close() for s in streams))
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
                if trace.ENABLED:
                    trace.event(trace.CLIENT, trace.STEP_CALLED)
                outputs.append(self.sequence.loop.run(self._step_all(piece, position + offset)))
                if trace.ENABLED:
                    trace.event(trace.CLIENT, trace.STEP_RETURNED)
        except BaseException:
            self.close()  # failover gave up: the caches can no longer be trusted
            raise
        self.position = position + hidden.shape[1]
        return torch.cat(outputs, dim=1).to(hidden.dtype)

    def rewind(self, length: int) -> None:
        """Forget every token after the first `length`: the next step starts there (the peers crop their caches
        when it arrives; the client's own local blocks crop theirs now)."""
        if not 0 <= length <= self.position:
            raise ValueError(f"cannot rewind a session of {self.position} tokens to {length}")
        for cache in self.local_caches.values():
            cache.crop(length - cache.get_seq_length())
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :length]
        self.position = length

    async def _step_all(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """One step through every span. With push, the client sends the step to the first peer only, naming the
        peers after it; each peer pushes its output straight into the next one's session and also returns it to
        the client, which keeps it as that next span's history (for failover) and waits for the next answer. If a
        pushed answer is late, the client sends the step itself (the peer computes a step only once); if a peer
        fails, its span is replaced and the rest of the step is relayed by the client."""
        push = self.sequence.config.push and len(self._streams) > 1
        if push:
            self._step_number += 1
        number = self._step_number if push else None
        failover = Failover(self.sequence.health, self.sequence.config, f"the step at position {position}")
        checks: list[asyncio.Task] = []  # spot checks of this step's spans, run while the chain goes on
        try:
            output = await self._chain(hidden, position, push, number, failover, checks)
            evidences = await gather_checks(checks) if checks else []  # most steps: no check, no gather
        finally:
            for task in checks:
                task.cancel()
        for evidence, span in evidences:
            # The step's output (and possibly earlier ones, unchecked) came from a liar: the peers' caches and the
            # tokens generated so far cannot be trusted. The liar is banned by now; redoing the work avoids it.
            raise_for(evidence, span.peer_id, reroutable=False)
        return output

    async def _chain(
        self, hidden: torch.Tensor, position: int, push: bool, number: int | None, failover: Failover,
        checks: list[asyncio.Task],
    ) -> torch.Tensor:  # fmt: skip
        direct = True  # the client sends stream i its input (else it should arrive pushed)
        relay_rest = False  # after a failover: no more pushes in this step (replacements were not named to anyone)
        i = 0
        while i < len(self._streams):
            stream = self._streams[i]
            where = trace.place("client", stream.start, stream.end) if trace.ENABLED else ""
            try:
                if not push:
                    if trace.ENABLED:
                        trace.event(where, trace.SENT, number)
                    output = await stream.step(hidden, position)
                else:
                    expected = Step(hidden, position, number)
                    output = None
                    if not direct:
                        output = await stream.receive(expected, grace=self.sequence.config.push_grace)
                        if output is None:
                            logger.debug(f"push to blocks {stream.uid} is late; sending step {number} directly")
                    if output is None:
                        if trace.ENABLED:
                            trace.event(where, trace.SENT, number)
                        chain = () if relay_rest else self._push_chain(i + 1)
                        await stream.send(Step(hidden, position, number, chain))
                        output = await stream.receive(expected)
                    direct = relay_rest or not self._push_chain(i + 1)
            except PeerError as e:
                await self._recover(i, e, position, failover)
                # The rest of this step goes through the client, still numbered: a peer after the failed one may
                # have had the step pushed already and must not compute it twice.
                relay_rest, direct = True, True
                continue  # the same input, now to the replacement
            if trace.ENABLED:
                trace.event(where, trace.OUTPUT, number)
            self._remember(i, hidden, position)
            if self.sequence.checker.sample():
                checks.append(asyncio.create_task(self._check_step(i, position, hidden.shape[1], output)))
            self.sequence.record_exposure(self.route[i], hidden.shape[0] * hidden.shape[1], "inference", self.ledger)
            self.sequence.health.succeeded(stream.peer_id)
            if not push:  # pushed answers include the upstream's time: not a round trip to this peer
                self.sequence.health.observe_rtt(stream.peer_id, stream.last_rtt)
                self.sequence.health.observe_compute(stream.peer_id, stream.end - stream.start, stream.last_elapsed)
            hidden = output
            i += 1
        return hidden

    async def _check_step(
        self, i: int, position: int, tokens: int, output: torch.Tensor
    ) -> tuple[Evidence | None, RouteSpan]:
        """Spot-check stream i's step: a replica runs a whole-sequence forward over everything the span received in
        this session, and its last `tokens` positions must match the step's output."""
        span, length = self.route[i], position + tokens
        inputs = self._history[i][:, :length]
        adapters = self.adapters.select(span.start, span.end)

        async def recompute(replica: RouteSpan) -> list[torch.Tensor]:
            full = await self.sequence.calls._forward_chunks(replica, inputs, adapters)
            return [full[:, position:length]]

        evidence = await self.sequence.checker.check(
            "step", span, f"position {position}", [output], recompute, length, inputs.shape[0] * length
        )
        return evidence, span

    async def _recover(self, i: int, error: PeerError, position: int, failover: Failover) -> None:
        """Replace stream i after `error`; a replacement may fail too, even while replaying."""
        while True:
            failover.failed(error)
            try:
                await self._replace(i, position, failover.route_timeout)
                return
            except PeerError as e:
                error = e

    def _push_chain(self, start: int) -> tuple[tuple[str, str], ...]:
        """(peer ID, push token) of streams start, start+1, ...; empty if one of them cannot take pushes."""
        chain = tuple((s.peer_id.to_base58(), s.push_token) for s in self._streams[start:])
        return () if any(token is None for _, token in chain) else chain

    @torch.inference_mode(False)  # a normal buffer: steps come from threads in and out of inference mode
    def _remember(self, i: int, hidden: torch.Tensor, position: int) -> None:
        # One buffer of max_length tokens per stream, written in place: no per-token copy of the whole history.
        if self._history[i] is None:
            self._history[i] = torch.empty(self.batch, self.max_length, hidden.shape[2], dtype=hidden.dtype)
        self._history[i][:, position : position + hidden.shape[1]] = hidden

    async def _replace(self, i: int, position: int, timeout: float | None) -> None:
        """Route the failed span's blocks to other peers and replay the span's history through them."""
        failed = self.route[i]
        logger.warning(f"blocks {failed.uid} failed at position {position}; re-routing")
        await self._streams[i].close()
        loop = asyncio.get_running_loop()
        cfg = self.sequence.config
        route = await loop.run_in_executor(
            None,
            lambda: self.sequence.make_route(
                self.max_length, failed.start, failed.end, timeout, tokens_needed=self._tokens_needed
            ),
        )
        streams = [self._new_stream(span) for span in route]
        await self._open_all(streams)
        history: list[torch.Tensor | None] = [None] * len(streams)
        past = self._history[i]
        if past is not None and position > 0:
            replay = past[:, :position]
            for j, stream in enumerate(streams):
                with torch.inference_mode(False):
                    history[j] = torch.empty_like(past)
                    history[j][:, :position] = replay
                outputs = []
                for offset in range(0, position, cfg.max_prefill_tokens):
                    piece = replay[:, offset : offset + cfg.max_prefill_tokens]
                    outputs.append(await stream.step(piece, offset))
                self.sequence.record_exposure(route[j], replay.shape[0] * position, "inference", self.ledger)
                replay = torch.cat(outputs, dim=1)
        self.route[i : i + 1] = route
        self._streams[i : i + 1] = streams
        self._history[i : i + 1] = history
        self.failovers += 1
        logger.info(f"blocks {failed.uid} now served by {[s.uid + '@' + str(s.peer_id)[-6:] for s in route]}")

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
