"""DHT storage budgets: the ledger's rules (no network), and a real `swarm-dht` refusing one sender's flood."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import wait_until
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from dht.budget import StorageBudget, StorageLedger

BUDGET = StorageBudget(
    max_value_bytes=100, max_sender_values=3, max_sender_bytes=200, max_values=5, max_bytes=1000, max_ttl=60.0
)


def key(name: str, subkey: str = "") -> tuple[bool, bytes, bytes]:
    return (False, name.encode(), subkey.encode())


def test_ledger_bounds_each_sender_in_values_and_bytes():
    ledger = StorageLedger(BUDGET)
    for i in range(3):
        assert ledger.refusal("a", [(key("k", str(i)), 10, 50.0)], now=0.0) is None
        ledger.record("a", key("k", str(i)), 10, 50.0)
    assert "dht_max_sender_values=3" in ledger.refusal("a", [(key("k", "3"), 10, 50.0)], now=0.0)
    # a replacement of one's own entry (a refresh) is no new value
    assert ledger.refusal("a", [(key("k", "0"), 10, 55.0)], now=0.0) is None
    assert "dht_max_sender_bytes=200" in ledger.refusal("b", [(key("x", "0"), 99, 50.0)] * 3, now=0.0)
    assert "dht_max_value_bytes=100" in ledger.refusal("b", [(key("x"), 101, 50.0)], now=0.0)
    assert ledger.usage("a") == (3, 30) and ledger.usage("b") == (0, 0)


def test_ledger_bounds_all_senders_and_forgets_what_expired():
    ledger = StorageLedger(BUDGET)
    for sender, names in (("a", "123"), ("b", "45")):
        for name in names:
            ledger.record(sender, key(name), 10, 50.0 if sender == "a" else 20.0)
    assert (ledger.values, ledger.bytes) == (5, 50)
    assert "dht_max_values=5" in ledger.refusal("c", [(key("6"), 10, 30.0)], now=0.0)
    # another sender overwriting an entry takes it over: the total does not grow
    assert ledger.refusal("c", [(key("1"), 10, 30.0)], now=0.0) is None
    ledger.record("c", key("1"), 10, 60.0)
    assert ledger.usage("a") == (2, 20) and ledger.usage("c") == (1, 10)
    # b's entries expired at 20: they no longer count
    assert ledger.refusal("c", [(key("6"), 10, 30.0), (key("7"), 10, 30.0)], now=21.0) is None
    assert (ledger.values, ledger.usage("b")) == (3, (0, 0))


def test_ledger_bounds_how_long_entries_live():
    ledger = StorageLedger(BUDGET)
    assert ledger.refusal("a", [(key("k"), 10, 160.0)], now=100.0) is None
    assert "dht_max_ttl=60" in ledger.refusal("a", [(key("k"), 10, 160.1)], now=100.0)
    assert "dht_max_ttl" in ledger.refusal("a", [(key("k"), 10, float("nan"))], now=100.0)


@pytest.fixture(scope="module")
def bootstrap_node():
    """A real `swarm-dht` with a small storage budget."""
    workdir = Path(tempfile.mkdtemp(prefix="blockswarm-dht-budget-"))
    ready = workdir / "ready.json"
    args = [sys.executable, "-c", "from peers.cli import dht_main; dht_main()", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    args += ["--ready-file", str(ready), "--log-level", "WARNING", "--dht-max-sender-values", "40"]
    args += ["--dht-max-values", "60", "--dht-max-value-bytes", "4096", "--dht-max-ttl", "600"]
    with open(workdir / "dht.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: ready.exists() or process.poll() is not None, "swarm-dht ready")
        assert process.poll() is None, (workdir / "dht.log").read_text()
        yield json.loads(ready.read_text())
    finally:
        process.terminate()
        process.wait(30)


STORE = DHTProtocol._get_handle_name(None, "rpc_store")
FIND = DHTProtocol._get_handle_name(None, "rpc_find")


async def _store(p2p: P2P, peer: PeerID, key_id: bytes, subkeys: list[str], value: bytes, ttl: float) -> list[bool]:
    expiration = get_dht_time() + ttl
    request = dht_pb2.StoreRequest(
        keys=[key_id] * len(subkeys),
        subkeys=[MSGPackSerializer.dumps(s) for s in subkeys],
        values=[value] * len(subkeys),
        expiration_time=[expiration] * len(subkeys),
        in_cache=[False] * len(subkeys),
    )
    response = await p2p.call_protobuf_handler(peer, STORE, request, dht_pb2.StoreResponse)
    return list(response.store_ok)


async def _stored_subkeys(p2p: P2P, peer: PeerID, key_id: bytes) -> int:
    response = await p2p.call_protobuf_handler(peer, FIND, dht_pb2.FindRequest(keys=[key_id]), dht_pb2.FindResponse)
    result = response.results[0]
    return len(MSGPackSerializer.loads(result.value)) if result.type == dht_pb2.FOUND_DICTIONARY else 0


def test_bootstrap_node_refuses_a_flood_beyond_its_budget(bootstrap_node):
    peer = PeerID.from_base58(bootstrap_node["peer_id"])
    key_id = DHTID.generate(source="flood").to_bytes()

    async def main() -> None:
        senders = [await P2P.create(initial_peers=bootstrap_node["maddrs"]) for _ in range(2)]
        try:
            a, b = senders
            accepted = []
            for batch in range(4):  # 100 subkeys from one sender: only its 40 are kept
                names = [f"a{batch}-{i}" for i in range(25)]
                accepted += await _store(a, peer, key_id, names, b"x" * 100, ttl=300)
            assert sum(accepted) == 40 and all(accepted[:40])
            # a refresh of a stored subkey replaces it within the budget; a new one is still refused
            assert await _store(a, peer, key_id, ["a0-0"], b"y" * 100, ttl=310) == [True]
            assert await _store(a, peer, key_id, ["a-new"], b"y", ttl=310) == [False]
            # too big, or expiring too far ahead: refused whatever the budget left
            assert await _store(b, peer, key_id, ["big"], b"z" * 5000, ttl=300) == [False]
            assert await _store(b, peer, key_id, ["far"], b"z", ttl=10**6) == [False]
            # a second sender has its own budget, up to the node's total of 60
            assert sum(await _store(b, peer, key_id, [f"b{i}" for i in range(30)], b"z", ttl=300)) == 20
            assert await _stored_subkeys(a, peer, key_id) == 60
        finally:
            for p2p in senders:
                await p2p.shutdown()

    asyncio.run(main())
