"""FederatedClient: one client of a federated run (DHT matchmaking, the P2P exchange, agreement, the release and
its privacy accounting); RoundResult: what one round did on it. The protocol is described in `swarm.federated`."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.timed_storage import get_dht_time

from peers.wire.framing import ProtocolError
from privacy.federated_accounting import FederatedAccountant, FederatedPrivacyReport, client_noise_std
from swarm.federated.config import FederatedConfig
from swarm.federated.errors import FederatedConfigError, FederatedError, RejectedUpdate
from swarm.federated.updates import (
    aggregate,
    agreed_set,
    check_update,
    clip_update,
    digest,
    flatten,
    noise_share,
    norm_bound,
    unflatten_into,
)
from swarm.federated.wire import STATE_ROUND, FetchRequest, VectorReply, handler_name

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round did on this client. `local_update` / `sent_update` are this client's own Δ (before clipping)
    and noisy update: keep them private (they are returned for diagnostics and tests)."""

    round: int
    completed: bool
    participated: bool
    participants: tuple[str, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)  # peer ID -> why its update was refused
    missing: tuple[str, ...] = ()  # announced, but no update or no confirmation arrived in time
    local_update: torch.Tensor | None = None
    sent_update: torch.Tensor | None = None
    adapter_digest: str = ""
    privacy: FederatedPrivacyReport | None = None


class FederatedClient:
    """One client of a federated run, training `params` (e.g. ``model.tuning.named_trainables()``).

    Uses the client's DHT, P2P and event loop (`for_model`). Call `start()` once (and `sync()` to join a run in
    progress), then `run_round(train)` per round, where `train()` does this client's local steps on `params`.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], dht: Any, p2p: P2P, loop: Any, config: FederatedConfig):
        self.params = dict(params)
        if not self.params:
            raise FederatedConfigError("a federated client needs trainable parameters (add prompts or LoRA first)")
        self.dht, self.p2p, self.loop, self.config = dht, p2p, loop, config
        self.numel = sum(p.numel() for p in self.params.values())
        if self.numel > config.max_update_numel:
            raise FederatedConfigError(
                f"the adapter has {self.numel} values, max_update_numel={config.max_update_numel}"
            )
        self.peer = p2p.peer_id.to_base58()
        self.noise_multiplier = config.resolved_noise_multiplier()
        self.noise_std = (
            client_noise_std(self.noise_multiplier, config.clip_norm, config.min_clients) if config.clip_norm else 0.0
        )
        self.bound = (
            None
            if config.clip_norm is None
            else norm_bound(config.clip_norm, self.noise_std, self.numel, config.norm_failure_probability)
        )
        self.accountant = FederatedAccountant(
            self.noise_multiplier, config.min_clients, config.participation_rate, config.delta, config.accountant
        )
        self.generator = torch.Generator()
        if config.seed is None:
            self.generator.seed()
            self._coins = random.SystemRandom()
        else:
            self.generator.manual_seed(config.seed)
            self._coins: random.Random = random.Random(config.seed)
        self.round = 0
        self._state = (0, flatten(self.params))  # (round, adapter) served to late joiners: never mid-training
        self._updates: dict[int, torch.Tensor] = {}  # round -> our noisy update, served to the others
        self._started = False

    @classmethod
    def for_model(cls, model: Any, config: FederatedConfig) -> FederatedClient:
        sequence = model.model.sequence
        return cls(model.tuning.named_trainables(), sequence.dht, sequence.p2p, sequence.loop, config)

    # ---- lifecycle ----

    def start(self) -> FederatedClient:
        self.loop.run(
            self.p2p.add_protobuf_handler(
                handler_name(self.config.run_name), self._serve, runtime_pb2.ExpertRequest, stream_output=True
            )
        )
        self._started = True
        self._announce_member()
        return self

    def shutdown(self) -> None:
        if self._started:
            self._started = False
            try:
                self.loop.run(self.p2p.remove_protobuf_handler(handler_name(self.config.run_name), stream_output=True))
            except Exception as e:  # the P2P may be gone already
                logger.debug(f"removing the federated handler failed: {e}")

    def __enter__(self) -> FederatedClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _key(self, *parts: object) -> str:
        return ".".join([self.config.run_name, "fed", *map(str, parts)])

    # ---- serving ----

    async def _serve(
        self, proto: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        request = FetchRequest.decode(proto)
        if request.round == STATE_ROUND:
            round_index, vector = self._state
        else:
            # the asker may be faster than our local training: wait for our update of that round, within limits
            deadline = time.monotonic() + self.config.exchange_timeout
            while request.round not in self._updates:
                if request.round < self.round - 1 or request.round > self.round + 1 or time.monotonic() > deadline:
                    raise ProtocolError(f"no update of round {request.round} here (at round {self.round})")
                await asyncio.sleep(self.config.poll_interval)
            round_index, vector = request.round, self._updates[request.round]
        for message in VectorReply(round_index, vector).encode(self.config.part_numel):
            yield message

    async def _fetch(self, peer: str, round_index: int) -> VectorReply:
        stream = await self.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer),
            handler_name(self.config.run_name),
            FetchRequest(round_index).encode(),
            runtime_pb2.ExpertResponse,
        )
        return await VectorReply.decode(stream, numel=self.numel, part_numel=self.config.part_numel)

    # ---- DHT records ----

    def _store(self, key: str, value: Any) -> None:
        if not self.dht.store(key, value, get_dht_time() + self.config.record_ttl, subkey=self.peer):
            logger.warning(f"federated: storing {key} in the DHT failed")

    def _read(self, key: str) -> dict[str, Any]:
        """Subkey -> value of a run's record, keeping only entries whose subkey is a peer ID."""
        found = self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        entries = {}
        for subkey, item in found.value.items():
            if not isinstance(subkey, str) or len(subkey) > 128:
                continue
            try:
                PeerID.from_base58(subkey)
            except Exception:
                continue
            entries[subkey] = item.value
        return entries

    def _announce_member(self) -> None:
        self._store(self._key("members"), self._state[0])

    # ---- joining a run in progress ----

    def sync(self, timeout: float | None = None) -> bool:
        """Download the adapter and round from the member of the run that is furthest along; False if the run has
        no other member yet (then this client starts it). Checks the vector like an update (shape, finiteness)."""
        deadline = time.monotonic() + (timeout or self.config.exchange_timeout)
        members = {p: r for p, r in self._read(self._key("members")).items() if p != self.peer and isinstance(r, int)}
        for peer in sorted(members, key=lambda p: -members[p]):
            try:
                reply = self.loop.run(self._fetch(peer, STATE_ROUND), max(deadline - time.monotonic(), 0.1))
                vector = check_update(reply.vector, self.numel, None)
            except Exception as e:
                logger.warning(f"federated: could not get the adapter from {peer}: {e}")
                continue
            if reply.round < 0:
                continue
            unflatten_into(vector, self.params)
            self.round = reply.round
            self._state = (self.round, vector.clone())
            self._announce_member()
            logger.info(f"federated: joined {self.config.run_name} at round {self.round} with {peer}'s adapter")
            return True
        return False

    # ---- a round ----

    def run_round(self, train: Callable[[], object]) -> RoundResult:
        """One federated round: local training with `train()` (unless this client sits it out by its
        participation coin), exchange, agreement, averaging. Returns what happened; the params hold the new
        adapter (or the old one if the round did not complete)."""
        config, r = self.config, self.round
        if config.target_epsilon is not None and config.rounds is not None and r >= config.rounds:
            raise FederatedError(f"σ was calibrated to spend ε={config.target_epsilon} in {config.rounds} rounds")
        if self._coins.random() >= config.participation_rate:
            return self._sit_out(r)
        theta = flatten(self.params)
        self._store(self._key(r, "join"), True)
        join_deadline = time.monotonic() + config.join_timeout
        try:
            train()
            local = flatten(self.params) - theta
        finally:
            unflatten_into(theta, self.params)
        sent = self.privatize(local)
        self._updates[r] = sent
        announced = self._gather(r, join_deadline)
        updates, rejected, missing = self._exchange(r, announced, sent)
        accepted = frozenset(updates)
        self._store(self._key(r, "agree"), sorted(accepted))
        confirmations = self._confirmations(r, accepted)
        final = agreed_set(accepted, confirmations)
        missing = tuple(sorted(set(missing) | (accepted - final)))
        result = RoundResult(
            r, False, True, tuple(sorted(final)), rejected, missing, local_update=local, sent_update=sent
        )
        if len(final) >= config.min_clients and self.peer in final:
            new = theta + aggregate({p: updates[p] for p in final})
            unflatten_into(new, self.params)
            result.completed = True
            result.privacy = self.accountant.record_round(r, len(final), sent_update=True)
        else:
            logger.warning(
                f"federated: round {r} of {config.run_name} left unreleased: {len(final)} agreed participants "
                f"(min_clients={config.min_clients}, this client {'in' if self.peer in final else 'not in'} them)"
            )
        self._finish(r, result)
        return result

    def privatize(self, local: torch.Tensor) -> torch.Tensor:
        """The update this client sends: Δ clipped to C, plus its share of the noise."""
        return clip_update(local, self.config.clip_norm) + noise_share(self.numel, self.noise_std, self.generator)

    def _sit_out(self, r: int) -> RoundResult:
        """Not taking part this round: wait for the others' result and download it (the coin is this client's
        secret: the others cannot tell it from a client that is not in the run)."""
        deadline = (
            time.monotonic() + self.config.join_timeout + self.config.exchange_timeout + self.config.agree_timeout
        )
        while time.monotonic() < deadline:
            members = self._read(self._key("members"))
            if any(isinstance(v, int) and v > r for p, v in members.items() if p != self.peer) and self.sync():
                break
            time.sleep(self.config.poll_interval)
        result = RoundResult(r, self.round > r, False)
        if result.completed:  # released while we sat out: it still counts for our data (the coin is random)
            result.participants = tuple(sorted(self._read(self._key(r, "agree"))))
            # counted as the minimum group, the least noise a completed round can have
            result.privacy = self.accountant.record_round(r, self.config.min_clients, sent_update=False)
        self.round = max(self.round, r + 1)
        result.adapter_digest = digest(flatten(self.params))
        return result

    def _gather(self, r: int, deadline: float) -> list[str]:
        while True:
            announced = sorted(self._read(self._key(r, "join")))
            if len(announced) >= self.config.expected_clients or time.monotonic() > deadline:
                break
            time.sleep(self.config.poll_interval)
        if self.peer not in announced:  # our own record may not be readable yet; we are in, by definition
            announced.append(self.peer)
        return announced

    def _exchange(
        self, r: int, announced: list[str], own: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
        """Fetch and check every other announced client's update, concurrently."""
        others = [p for p in announced if p != self.peer]

        async def fetch_all() -> list[VectorReply | BaseException]:
            return await asyncio.gather(
                *(asyncio.wait_for(self._fetch(p, r), self.config.exchange_timeout) for p in others),
                return_exceptions=True,
            )

        replies = self.loop.run(fetch_all()) if others else []
        updates, rejected, missing = {self.peer: own}, {}, []
        for peer, reply in zip(others, replies, strict=True):
            if isinstance(reply, RejectedUpdate | ProtocolError) or (
                isinstance(reply, VectorReply) and reply.round != r
            ):
                reason = str(reply) if isinstance(reply, BaseException) else f"it is for round {reply.round}"
                rejected[peer] = reason
                logger.warning(f"federated: rejected the update of {peer} in round {r}: {reason}")
                continue
            if isinstance(reply, BaseException):
                missing.append(peer)
                logger.warning(f"federated: no update from {peer} in round {r}: {type(reply).__name__}: {reply}")
                continue
            try:
                updates[peer] = check_update(reply.vector, self.numel, self.bound)
            except RejectedUpdate as e:
                rejected[peer] = str(e)
                logger.warning(f"federated: rejected the update of {peer} in round {r}: {e}")
        return updates, rejected, missing

    def _confirmations(self, r: int, accepted: frozenset[str]) -> dict[str, frozenset[str]]:
        deadline = time.monotonic() + self.config.agree_timeout
        while True:
            confirmations = {
                p: frozenset(v)
                for p, v in self._read(self._key(r, "agree")).items()
                if isinstance(v, list) and all(isinstance(x, str) for x in v)
            }
            confirmations.setdefault(self.peer, accepted)  # ours, even if the DHT does not show it yet
            if accepted <= set(confirmations) or time.monotonic() > deadline:
                return confirmations
            time.sleep(self.config.poll_interval)

    def _finish(self, r: int, result: RoundResult) -> None:
        self.round = r + 1
        vector = flatten(self.params)
        self._state = (self.round, vector)
        result.adapter_digest = digest(vector)
        for old in [k for k in self._updates if k < r]:  # the others may still fetch this round's
            del self._updates[old]
        self._announce_member()
        privacy = result.privacy
        logger.info(
            f"federated: round {r} of {self.config.run_name}: {'completed' if result.completed else 'void'} with "
            f"{len(result.participants)} clients, adapter {result.adapter_digest}"
            + (f", ε={privacy.epsilon:.3g} (δ={privacy.delta})" if privacy else "")
        )
