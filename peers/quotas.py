"""Per-client quotas and the peer's memory budget: what each client (a remote peer ID) may hold at once, and the
bytes that everything held on the peer's behalf may take in all.

A client is whoever opened the stream, as libp2p authenticates it (its peer ID). Each stream keeps a
:class:`Holding` of what it took for its client (the stream itself, sessions, cache tokens, trainable tensors,
queued compute, message bytes); closing the stream gives all of it back, whatever way the stream ended. Amounts
counted in bytes also come out of one :class:`ByteBudget` shared by all clients, so that the peer's memory stays
within a bound that does not depend on the mix of requests (see :func:`rss_bound`).

Everything here runs on the peer's event loop (no locks) and is pure bookkeeping, tested without a network.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from peers.wire.framing import ProtocolError

# A received frame is held up to this many times over while its request is served: the frame's payload, the parsed
# protobuf, the decoded tensors, and the reply (same size as the input for hidden states) on its way out.
MESSAGE_COPIES = 4


class Resource:
    """What a client holds, each spelled once; the per-client limit of each is the setting of the same name."""

    STREAMS = "streams"  # open streams (each a file descriptor on the peer)
    SESSIONS = "sessions"  # open inference sessions
    CACHE_TOKENS = "cache_tokens"  # KV-cache tokens reserved by its sessions (batch x max_length)
    TRAINABLE_BYTES = "trainable_bytes"  # deep prompts and LoRA tensors kept for its sessions and requests
    QUEUED_TOKENS = "queued_tokens"  # tokens of its computations waiting or running
    REQUEST_BYTES = "request_bytes"  # bytes of its messages being read, decoded, computed on and answered
    HELD_BYTES = "held_bytes"  # estimated bytes of the autograd graphs held for its train calls


# Counted in bytes: these also come out of the shared ByteBudget.
BYTE_RESOURCES = frozenset({Resource.TRAINABLE_BYTES, Resource.REQUEST_BYTES, Resource.HELD_BYTES})


class QuotaExceeded(ProtocolError):
    """A client asked for more than its share (or the peer for more than it has); the message names the resource,
    the amounts and the setting that limits it. Sent to the client as an error; it may retry later or elsewhere."""

    def __init__(self, resource: str, setting: str, limit: int, used: int, amount: int, scope: str):
        self.resource, self.setting, self.limit, self.used, self.amount = resource, setting, limit, used, amount
        super().__init__(
            f"{scope} quota of {resource} exceeded: {used} held + {amount} asked > limit {limit} ({setting}); "
            "retry later or use another peer"
        )


class MemoryBudgetExceeded(QuotaExceeded):
    """The peer's memory budget (all clients together) has no room for this request now."""


@dataclass(frozen=True)
class ClientQuotas:
    """Limits per client and in all (from PeerConfig). `per_client[resource]` / `total[resource]`: None = no limit."""

    per_client: dict[str, int | None]
    total: dict[str, int | None]
    memory_budget: int  # bytes, over BYTE_RESOURCES of all clients


# The setting (PeerConfig field) behind each limit, named in errors.
PER_CLIENT_SETTINGS = {
    Resource.STREAMS: "--max-client-streams",
    Resource.SESSIONS: "--max-client-sessions",
    Resource.CACHE_TOKENS: "--max-client-cache-tokens",
    Resource.TRAINABLE_BYTES: "--max-client-trainable-bytes",
    Resource.QUEUED_TOKENS: "--max-client-queued-tokens",
    Resource.REQUEST_BYTES: "--max-client-request-bytes",
}
TOTAL_SETTINGS = {Resource.STREAMS: "--max-streams"}


class ByteBudget:
    """Bytes held for all clients together (messages, decoded requests, trainables, held graphs), against a total."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.peak = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def take(self, amount: int, resource: str) -> None:
        if self.used + amount > self.total:
            raise MemoryBudgetExceeded(resource, "--memory-budget", self.total, self.used, amount, "the peer's memory")
        self.used += amount
        self.peak = max(self.peak, self.used)

    def give_back(self, amount: int) -> None:
        self.used -= amount


class ClientLedger:
    """What every client holds now, against the per-client and total limits."""

    def __init__(self, quotas: ClientQuotas):
        self.quotas = quotas
        self.budget = ByteBudget(quotas.memory_budget)
        self._held: dict[str, collections.Counter[str]] = {}
        self._totals: collections.Counter[str] = collections.Counter()

    def held(self, client: str, resource: str) -> int:
        counter = self._held.get(client)
        return 0 if counter is None else counter[resource]

    def total(self, resource: str) -> int:
        return self._totals[resource]

    @property
    def clients(self) -> int:
        return len(self._held)

    def take(self, client: str, resource: str, amount: int) -> None:
        """Hold `amount` of `resource` for `client`, or raise QuotaExceeded (nothing taken then)."""
        if amount < 0:
            raise ValueError(f"cannot take a negative amount of {resource}")
        used = self.held(client, resource)
        limit = self.quotas.per_client.get(resource)
        if limit is not None and used + amount > limit:
            raise QuotaExceeded(resource, PER_CLIENT_SETTINGS[resource], limit, used, amount, "this client's")
        total_limit = self.quotas.total.get(resource)
        if total_limit is not None and self._totals[resource] + amount > total_limit:
            setting = TOTAL_SETTINGS[resource]
            raise QuotaExceeded(resource, setting, total_limit, self._totals[resource], amount, "the peer's")
        if resource in BYTE_RESOURCES:
            self.budget.take(amount, resource)
        self._held.setdefault(client, collections.Counter())[resource] += amount
        self._totals[resource] += amount

    def give_back(self, client: str, resource: str, amount: int) -> None:
        counter = self._held[client]
        counter[resource] -= amount
        self._totals[resource] -= amount
        if resource in BYTE_RESOURCES:
            self.budget.give_back(amount)
        if not any(counter.values()):
            del self._held[client]  # a client holding nothing costs no memory here either


class Holding:
    """What one stream took for its client. close() gives back everything still held (idempotent)."""

    def __init__(self, ledger: ClientLedger, client: str):
        self.ledger, self.client = ledger, client
        self._held: collections.Counter[str] = collections.Counter()

    def take(self, resource: str, amount: int) -> None:
        self.ledger.take(self.client, resource, amount)
        self._held[resource] += amount

    def give_back(self, resource: str, amount: int) -> None:
        amount = min(amount, self._held[resource])
        if amount > 0:
            self.ledger.give_back(self.client, resource, amount)
            self._held[resource] -= amount

    def held(self, resource: str) -> int:
        return self._held[resource]

    def close(self) -> None:
        for resource, amount in list(self._held.items()):
            self.give_back(resource, amount)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held_graph_bytes(
    tokens: int, seq_len: int, n_blocks: int, hidden: int, intermediate: int, heads: int, dtype_bytes: int
) -> int:
    """An estimate, on the high side, of what an autograd graph of `tokens` tokens through `n_blocks` decoder
    layers keeps: per token and layer, about a dozen hidden-sized tensors (norms, q/k/v, attention output,
    residuals), four intermediate-sized ones (gate, up, their product, the activation) and a row of attention
    weights per head."""
    return tokens * n_blocks * dtype_bytes * (12 * hidden + 4 * intermediate + heads * seq_len)


def rss_bound(
    baseline: int,
    weight_bytes: int,
    cache_tokens: int,
    kv_bytes_per_token: int,
    memory_budget: int,
    compute_bytes: int,
    max_streams: int,
    stream_buffer_bytes: int,
) -> int:
    """The peer's resident memory bound: the process and libraries at start (`baseline`), the weights, every KV
    cache the token budget allows, everything the byte budget counts (messages, decoded requests, trainables, held
    graphs), one computation's working memory (the scheduler runs one at a time), and each stream's read buffer
    beyond what its frame was charged for."""
    return (
        baseline
        + weight_bytes
        + cache_tokens * kv_bytes_per_token
        + memory_budget
        + compute_bytes
        + max_streams * stream_buffer_bytes
    )
