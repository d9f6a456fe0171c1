"""Budgets of what other nodes may store in this node's DHT storage: per sender and in all, in values and bytes.

hivemind's DHT stores whatever a remote node asks it to (rpc_store) as long as the record validators accept it,
with no bound: a key outside our schema, a 1 MiB value, thousands of subkeys. Validators see a record but not who
sent it, so the budget sits in front of rpc_store instead: :func:`install_storage_budget` replaces the node's
store handler (by its public P2P handler API, in the DHT process) with one that asks a :class:`StorageLedger`
before each item and passes admitted items on to hivemind's own rpc_store, unchanged.

The sender is the remote peer ID that libp2p authenticated for the call. An entry counts against its sender until
it expires; no entry may expire more than ``max_ttl`` seconds ahead, so whatever a sender (or many) stored is gone
within that time at the latest.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import P2PContext
from hivemind.proto import dht_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.auth import AuthRole, AuthRPCWrapper
from hivemind.utils.timed_storage import get_dht_time

logger = logging.getLogger(__name__)

STORE_HANDLER = "rpc_store"  # the DHTProtocol method (and, with its class name, the P2P handler) replaced here

EntryKey = tuple[bool, bytes, bytes]  # (in cache, key, subkey tag)


@dataclass(frozen=True)
class StorageBudget:
    """Limits of DHT storage taken by other nodes (from DhtNodeConfig's dht_* settings)."""

    max_value_bytes: int  # one value (with its key and subkey)
    max_sender_values: int  # values and subkeys one sender may have stored at once
    max_sender_bytes: int
    max_values: int  # of all senders together
    max_bytes: int
    max_ttl: float  # seconds: how far ahead an entry may expire


@dataclass(frozen=True)
class _Entry:
    sender: Any
    size: int
    expiration: float


class StorageLedger:
    """Who stored which entries, until when; answers whether a new entry fits the budget. Pure bookkeeping: no
    network, no clock (callers pass `now`), run on one event loop."""

    def __init__(self, budget: StorageBudget):
        self.budget = budget
        self._entries: dict[EntryKey, _Entry] = {}
        self._usage: dict[Any, list[int]] = {}  # sender -> [values, bytes]
        self._expiring: list[tuple[float, EntryKey]] = []  # heap; stale items are skipped when popped
        self.values = 0
        self.bytes = 0
        self.refused = 0

    def usage(self, sender: Any) -> tuple[int, int]:
        values, size = self._usage.get(sender, (0, 0))
        return values, size

    def refusal(self, sender: Any, entries: list[tuple[EntryKey, int, float]], now: float) -> str | None:
        """Why storing `entries` ((key, size, expiration) each) for `sender` would break the budget; None if it
        fits. Entries that replace ones already stored are counted as replacements, not additions."""
        self._expire(now)
        b = self.budget
        values, size = self.usage(sender)
        total_values, total_bytes = self.values, self.bytes
        for key, entry_size, expiration in entries:
            if entry_size > b.max_value_bytes:
                return f"a value of {entry_size} bytes exceeds dht_max_value_bytes={b.max_value_bytes}"
            if not expiration <= now + b.max_ttl:
                return f"an entry expiring in {expiration - now:.0f} s exceeds dht_max_ttl={b.max_ttl:g} s"
            old = self._entries.get(key)
            if old is not None:
                total_values, total_bytes = total_values - 1, total_bytes - old.size
                if old.sender == sender:
                    values, size = values - 1, size - old.size
            values, size = values + 1, size + entry_size
            total_values, total_bytes = total_values + 1, total_bytes + entry_size
        if values > b.max_sender_values:
            return f"this sender would hold {values} values, over dht_max_sender_values={b.max_sender_values}"
        if size > b.max_sender_bytes:
            return f"this sender would hold {size} bytes, over dht_max_sender_bytes={b.max_sender_bytes}"
        if total_values > b.max_values:
            return f"storage would hold {total_values} values, over dht_max_values={b.max_values}"
        if total_bytes > b.max_bytes:
            return f"storage would hold {total_bytes} bytes, over dht_max_bytes={b.max_bytes}"
        return None

    def record(self, sender: Any, key: EntryKey, size: int, expiration: float) -> None:
        """`sender` stored `key` (replacing whatever was there, whoever stored it)."""
        self._remove(key)
        self._entries[key] = _Entry(sender, size, expiration)
        usage = self._usage.setdefault(sender, [0, 0])
        usage[0] += 1
        usage[1] += size
        self.values += 1
        self.bytes += size
        heapq.heappush(self._expiring, (expiration, key))

    def _remove(self, key: EntryKey) -> None:
        old = self._entries.pop(key, None)
        if old is None:
            return
        usage = self._usage[old.sender]
        usage[0] -= 1
        usage[1] -= old.size
        if usage[0] == 0:
            del self._usage[old.sender]
        self.values -= 1
        self.bytes -= old.size

    def _expire(self, now: float) -> None:
        while self._expiring and self._expiring[0][0] < now:
            expiration, key = heapq.heappop(self._expiring)
            entry = self._entries.get(key)
            if entry is not None and entry.expiration == expiration:  # not replaced since
                self._remove(key)


def _entries_of(
    key: bytes, tag: bytes, value: bytes, expiration: float, in_cache: bool
) -> list[tuple[EntryKey, int, float]]:
    """The ledger entries one store item makes: one, or one per subkey of a whole dictionary. Raises ValueError
    for a dictionary that does not decode."""
    if tag != DHTProtocol.IS_DICTIONARY:
        return [((in_cache, key, tag), len(key) + len(tag) + len(value), expiration)]
    try:
        dictionary = MSGPackSerializer.loads(value)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"a dictionary value that does not decode: {e!r}") from None
    if not isinstance(dictionary, DictionaryDHTValue):
        raise ValueError("a dictionary value that is not a dictionary")
    entries = []
    for subkey, (item, item_expiration) in dictionary.items():
        subkey_tag = MSGPackSerializer.dumps(subkey)
        size = len(key) + len(subkey_tag) + len(item)
        entries.append(((in_cache, key, subkey_tag), size, item_expiration))
    return entries


class BudgetedStore:
    """rpc_store in front of hivemind's: each item is admitted by the ledger (for the calling peer) or refused
    (store_ok False), then stored by hivemind's rpc_store as it would be without a budget."""

    def __init__(self, protocol: DHTProtocol, ledger: StorageLedger):
        self.protocol, self.ledger = protocol, ledger

    async def rpc_store(self, request: dht_pb2.StoreRequest, context: P2PContext) -> dht_pb2.StoreResponse:
        protocol, sender = self.protocol, context.remote_id
        response = dht_pb2.StoreResponse(store_ok=[], peer=protocol.node_info)
        fields = (request.keys, request.subkeys, request.values, request.expiration_time, request.in_cache)
        if len({len(f) for f in fields}) != 1:
            return response  # hivemind would fail an assert: an empty answer says nothing was stored
        peer = request.peer if request.HasField("peer") else None
        for key, tag, value, expiration, in_cache in zip(*fields, strict=True):
            try:
                entries = _entries_of(key, tag, value, expiration, in_cache)
                reason = self.ledger.refusal(sender, entries, get_dht_time())
            except ValueError as e:
                reason = str(e)
            if reason is not None:
                self.ledger.refused += 1
                logger.debug(f"refused a DHT store from {sender}: {reason}")
                response.store_ok.append(False)
                continue
            item = dht_pb2.StoreRequest(
                keys=[key], subkeys=[tag], values=[value], expiration_time=[expiration], in_cache=[in_cache], peer=peer
            )
            peer = None  # hivemind pings a requesting peer back: once per request, as it would
            try:
                ok = bool((await protocol.rpc_store(item, context)).store_ok[0])
            except Exception as e:  # hivemind asserts on some malformed values; a refusal, not our failure
                logger.debug(f"hivemind refused a DHT store from {sender}: {e!r}")
                ok = False
            if ok:
                for entry_key, size, entry_expiration in entries:
                    self.ledger.record(sender, entry_key, size, entry_expiration)
            response.store_ok.append(ok)
        return response


async def install_storage_budget(dht: Any, node: DHTNode, budget: StorageBudget) -> None:
    """Put a :class:`BudgetedStore` in front of `node`'s store handler. Runs in the DHT process (pass it to
    ``DHT.run_coroutine``); a client-mode node serves no stores and is left as it is."""
    protocol = node.protocol
    if protocol.client_mode:
        return
    name = type(protocol)._get_handle_name(None, STORE_HANDLER)
    store = BudgetedStore(protocol, StorageLedger(budget))
    handler = AuthRPCWrapper(store, AuthRole.SERVICER, protocol.authorizer).rpc_store
    await protocol.p2p.remove_protobuf_handler(name)
    await protocol.p2p.add_protobuf_handler(name, handler, dht_pb2.StoreRequest)
