"""dht.records / dht.announce / dht.identity: signed, schema-checked server records in a real local hivemind DHT."""

from __future__ import annotations

from pathlib import Path

import hivemind
import pytest
from conftest import wait_until
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from dht.announce import announce_blocks, fetch_block_servers
from dht.identity import load_or_create_identity, peer_id_of
from dht.records import (
    BlockServer,
    InvalidPrefixError,
    PeerAnnouncement,
    ServerRecord,
    block_key,
    check_prefix,
    make_validators,
    owner_peer_id,
    parse_block_entries,
    peer_announcements,
)

PREFIX = "tiny-model"
NUM_BLOCKS = 8
LOCALHOST = ["/ip4/127.0.0.1/tcp/0"]


def make_record(**overrides) -> ServerRecord:
    values = dict(
        state="online",
        start=0,
        end=2,
        throughput=10.0,
        dtype="float32",
        quant="none",
        cache_tokens_left=1000,
        max_length=64,
        version="0.1.0",
    )
    values.update(overrides)
    return ServerRecord(**values)


class Node:
    def __init__(self, identity_path: Path | None, initial_peers=(), validators: bool = True):
        self.identity = load_or_create_identity(identity_path)
        self.signer = RSASignatureValidator(self.identity.private_key)
        self.dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            host_maddrs=LOCALHOST,
            identity_path=str(self.identity.path),
            record_validators=make_validators(PREFIX, NUM_BLOCKS, self.signer) if validators else [self.signer],
        )

    def store(self, block: int, value, subkey, ttl: float = 30.0) -> bool:
        return self.dht.store(block_key(PREFIX, block), value, get_dht_time() + ttl, subkey=subkey)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two DHT nodes on 127.0.0.1, both running the model's validators."""
    keys = tmp_path_factory.mktemp("identities")
    a = Node(keys / "a.key")
    b = None
    try:
        b = Node(keys / "b.key", initial_peers=a.dht.get_visible_maddrs())
        yield a, b
    finally:
        for node in (b, a):
            if node is not None:
                node.dht.shutdown()


def _servers(node: Node, block: int) -> dict:
    return {s.peer_id: s for s in fetch_block_servers(node.dht, PREFIX, [block])[block]}


def test_nodes_listen_on_localhost_only(nodes):
    for node in nodes:
        maddrs = [str(m) for m in node.dht.get_visible_maddrs()]
        assert maddrs and all(m.startswith("/ip4/127.0.0.1/") for m in maddrs), maddrs


def test_announce_then_fetch_from_other_node(nodes):
    a, b = nodes
    assert a.dht.peer_id == a.identity.peer_id  # the DHT runs under the identity that signs the records
    assert a.identity.peer_id != b.identity.peer_id
    record = make_record(start=0, end=2, throughput=12.5, public_name="alice")
    assert announce_blocks(a.dht, PREFIX, [0, 1], record, a.signer, ttl_s=30)

    found = fetch_block_servers(b.dht, PREFIX, [0, 1, 7])
    assert found[7] == []
    for block in (0, 1):
        [server] = found[block]
        assert server.peer_id == a.identity.peer_id == a.dht.peer_id
        assert server.block == block
        assert server.record == record
        assert get_dht_time() + 20 < server.expiration <= get_dht_time() + 30


def test_other_node_cannot_write_under_owner_subkey(nodes):
    a, b = nodes
    assert announce_blocks(a.dht, PREFIX, [2], make_record(start=2, end=3, throughput=10.0), a.signer, ttl_s=30)
    forged = make_record(start=2, end=3, throughput=99.0).to_value()  # schema-valid: only the owner is wrong
    assert b.store(2, forged, subkey=a.signer.local_public_key) is False
    # The same record under b's own subkey is accepted: the rejection above is about ownership.
    assert b.store(2, forged, subkey=b.signer.local_public_key) is True

    for reader in (a, b):
        servers = _servers(reader, 2)
        assert set(servers) == {a.identity.peer_id, b.identity.peer_id}
        assert servers[a.identity.peer_id].record.throughput == 10.0  # unchanged
        assert servers[b.identity.peer_id].record.throughput == 99.0


@pytest.mark.parametrize(
    "change",
    [
        {"throughput": 5},  # int where a float is required: no conversions allowed
        {"state": "weird"},
        {"extra_field": 1},
        {"start": "0"},
        {"dtype": "int8"},
        {"start": 1, "end": 1},  # empty span
        {"cache_tokens_left": -1},
    ],
    ids=lambda c: ",".join(c),
)
def test_schema_violations_are_rejected(nodes, change):
    a, _ = nodes
    good = make_record(start=3, end=4, throughput=7.0)
    assert announce_blocks(a.dht, PREFIX, [3], good, a.signer, ttl_s=30)
    bad = {**good.to_value(), **change}
    assert a.store(3, bad, subkey=a.signer.local_public_key) is False
    assert a.store(3, "not a dict", subkey=a.signer.local_public_key) is False
    assert _servers(a, 3)[a.identity.peer_id].record == good


def test_unowned_subkey_is_rejected_by_validating_nodes(nodes):
    a, _ = nodes
    assert a.store(6, make_record(start=6, end=7).to_value(), subkey=b"plain-subkey") is False
    assert _servers(a, 6) == {}


def test_record_expires(nodes):
    a, b = nodes
    ttl = 1.5
    assert announce_blocks(a.dht, PREFIX, [4], make_record(start=4, end=5), a.signer, ttl_s=ttl)
    deadline = get_dht_time() + ttl
    assert list(_servers(b, 4)) == [a.identity.peer_id]
    wait_until(lambda: get_dht_time() > deadline and _servers(b, 4) == {} and _servers(a, 4) == {}, "expiry", 30)


def test_unsigned_entries_are_ignored_by_fetch(tmp_path):
    """A node without the schema validator stores anything; fetch_block_servers still returns only valid records."""
    node = Node(tmp_path / "c.key", validators=False)
    try:
        good = make_record(start=0, end=1)
        assert announce_blocks(node.dht, PREFIX, [0], good, node.signer, ttl_s=30)
        assert node.store(0, good.to_value(), subkey=b"plain-subkey")  # accepted: no schema on this node
        assert node.store(1, good.to_value(), subkey="plain-string-subkey")
        assert node.store(2, {**good.to_value(), "throughput": 3}, subkey=node.signer.local_public_key)

        raw = node.dht.get(block_key(PREFIX, 0), latest=True).value
        assert len(raw) == 2  # both entries are really in the DHT...
        found = fetch_block_servers(node.dht, PREFIX, [0, 1, 2])
        assert [s.peer_id for s in found[0]] == [node.identity.peer_id]  # ...but only the signed one is returned
        assert found[0][0].record == good
        assert found[1] == []
        assert found[2] == []
    finally:
        node.dht.shutdown()


# ---- parse_block_entries (no network) ----


@pytest.fixture(scope="module")
def signer() -> RSASignatureValidator:
    return RSASignatureValidator(load_or_create_identity(None).private_key)


def test_parse_block_entries_drops_malformed(signer):
    exp = get_dht_time() + 30
    good_value = make_record(start=0, end=4).to_value()
    other = RSASignatureValidator(load_or_create_identity(None).private_key)
    entries = {
        signer.local_public_key: (good_value, exp),
        other.local_public_key: (make_record(start=2, end=3).to_value(), exp),  # span does not contain block 1
        "[owner:not-bytes]": (good_value, exp),
        b"no-owner-marker": (good_value, exp),
        b"[owner:ssh-rsa garbage]": (good_value, exp),
        b"[owner:garbage]": (good_value, exp),
        b"[owner:" + other.local_public_key[7:-1] + b"] trailing": (good_value, exp),
    }
    [server] = parse_block_entries(1, entries)
    assert server.peer_id == peer_id_of(signer._private_key.get_public_key())
    assert server.block == 1 and server.expiration == exp
    assert server.record == make_record(start=0, end=4)


@pytest.mark.parametrize(
    "value",
    [
        "not a dict",
        ["a", "list"],
        None,
        {**make_record().to_value(), "start": 3, "end": 3},
        {**make_record().to_value(), "start": 3, "end": 2},
        {**make_record().to_value(), "throughput": 1},
        {**make_record().to_value(), "record_version": True},
        {**make_record().to_value(), "extra": 0},
        {k: v for k, v in make_record().to_value().items() if k != "state"},
    ],
    ids=["str", "list", "none", "start==end", "start>end", "int-throughput", "bool-version", "extra", "missing"],
)
def test_parse_block_entries_drops_bad_values(signer, value):
    exp = get_dht_time() + 30
    assert parse_block_entries(0, {signer.local_public_key: (value, exp)}) == []
    # control: the same subkey with a good value is kept
    assert len(parse_block_entries(0, {signer.local_public_key: (make_record().to_value(), exp)})) == 1


@pytest.mark.parametrize("block", [-1, 2, 3, 100])
def test_parse_block_entries_block_outside_span(signer, block):
    value = make_record(start=0, end=2).to_value()
    assert parse_block_entries(block, {signer.local_public_key: (value, 1.0)}) == []


def test_parse_block_entries_bad_expiration(signer):
    assert parse_block_entries(0, {signer.local_public_key: (make_record().to_value(), "soon")}) == []


def test_owner_peer_id(signer):
    assert owner_peer_id(signer.local_public_key) == peer_id_of(signer._private_key.get_public_key())
    for bad in ("str", b"", b"[owner:]", b"[owner:ssh-rsa AAAA]", b"prefix" + signer.local_public_key):
        with pytest.raises(ValueError):
            owner_peer_id(bad)


# ---- peer_announcements (pure: no network) ----

A, B = PeerID(b"peer-a"), PeerID(b"peer-b")


def block_servers(*entries: tuple[PeerID, list[int], ServerRecord, float]) -> dict[int, list[BlockServer]]:
    """(peer, blocks, record, expiration) -> what fetch_block_servers returns (block -> servers)."""
    servers: dict[int, list[BlockServer]] = {}
    for peer, blocks, record, expiration in entries:
        for block in blocks:
            servers.setdefault(block, []).append(BlockServer(peer, block, record, expiration))
    return servers


def test_peer_announcements_freshest_record_stands_for_the_peer():
    servers = block_servers(
        (A, [0], make_record(start=0, end=2, cache_tokens_left=1), 10.0),
        (A, [1], make_record(start=0, end=2, cache_tokens_left=5), 20.0),  # a newer refresh of the same span
        (B, [1, 2], make_record(start=1, end=3, state="joining"), 15.0),
    )
    found = peer_announcements(servers)
    assert found[A] == PeerAnnouncement(A, make_record(start=0, end=2, cache_tokens_left=5), (0, 1), 0, 2, 20.0)
    assert (found[B].state, found[B].blocks, found[B].start, found[B].end) == ("joining", (1, 2), 1, 3)
    assert peer_announcements({}) == {} and peer_announcements({0: [], 1: []}) == {}


def test_peer_announcements_ignore_leftovers_of_an_earlier_span_or_state():
    servers = block_servers(
        (A, [0, 1], make_record(start=0, end=2), 100.0),  # left over from before a move
        (A, [2, 3], make_record(start=2, end=4), 150.0),
        (B, [0], make_record(start=0, end=2), 100.0),
        (B, [1], make_record(start=0, end=2, state="offline"), 150.0),  # went offline: its online record is stale
    )
    found = peer_announcements(servers)
    assert (found[A].blocks, found[A].start, found[A].end) == ((2, 3), 2, 4)
    assert (found[B].state, found[B].blocks, found[B].expiration) == ("offline", (1,), 150.0)


def test_peer_announcements_serve_the_contiguous_run_of_announced_blocks():
    # block 5's record lapsed: all found blocks are listed, but only the run from the first is one span
    found = peer_announcements(block_servers((A, [4, 6, 7], make_record(start=4, end=8), 100.0)))
    assert (found[A].blocks, found[A].start, found[A].end) == ((4, 6, 7), 4, 5)
    # the span's first block lapsed: the run starts at the first block found
    found = peer_announcements(block_servers((A, [2, 3], make_record(start=1, end=4), 100.0)))
    assert (found[A].start, found[A].end) == (2, 4)


# ---- prefixes and identities ----


@pytest.mark.parametrize("prefix", ["", "-leading-dash", "has space", "a/b", "x" * 129, "ünïcode", "a_block:1"])
def test_check_prefix_rejects(prefix, signer):
    with pytest.raises(InvalidPrefixError):
        check_prefix(prefix)
    with pytest.raises(InvalidPrefixError):
        make_validators(prefix, 4, signer)


@pytest.mark.parametrize("prefix", ["tiny-llama", "Llama-3.1-8B", "a", "x" * 128, "model_v2"])
def test_check_prefix_accepts(prefix):
    assert check_prefix(prefix) == prefix


def test_identity_is_stable(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    first = load_or_create_identity(path)
    assert path.exists()
    second = load_or_create_identity(path)
    assert first.peer_id == second.peer_id
    assert first.private_key.get_public_key().to_bytes() == second.private_key.get_public_key().to_bytes()
    assert peer_id_of(first.private_key.get_public_key()) == first.peer_id
    other = load_or_create_identity(tmp_path / "other.key")
    assert other.peer_id != first.peer_id
    assert peer_id_of(other.private_key.get_public_key()) == other.peer_id


def test_fresh_identities_differ():
    a, b = load_or_create_identity(None), load_or_create_identity(None)
    assert a.peer_id != b.peer_id
    assert a.path.exists() and a.path != b.path
