"""An attacker's phantom peers: properly signed block records for peer IDs that run nothing.

Each phantom has its own fresh RSA key, so its records pass every signature and schema check and bind to the peer ID
derived from that key; no process listens under that ID. All phantoms are published from one DHT node (a second
process with its own libp2p daemon, like any peer's), through dht.announce.announce_blocks, the same code peers
announce with. Used by tests/test_phantoms.py and scripts/bench_phantoms.py.
"""

from __future__ import annotations

import dataclasses

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from dht.announce import announce_blocks
from dht.identity import peer_id_of
from dht.node import start_dht_node
from dht.records import ServerRecord, make_validators

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class ManyKeySigner(RSASignatureValidator):
    """Signs a record with whichever of its keys owns the record's subkey (hivemind's validator holds one key, and
    one DHT node keeps only one RSASignatureValidator). Validation is hivemind's, unchanged."""

    def __init__(self, keys: list[RSAPrivateKey]):
        super().__init__(keys[0])
        self._keys = {RSASignatureValidator(k).local_public_key: k for k in keys}

    def sign_value(self, record: DHTRecord) -> bytes:
        for marker, key in self._keys.items():
            if marker in record.key or marker in (record.subkey or b""):
                signature = key.sign(self._serialize_record(record))
                return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)
        return record.value


def phantom_record(start: int, end: int, throughput: float = 1e9, version: str = "0.0.0") -> ServerRecord:
    """What an attacker claims: online, serving [start, end) at `throughput`, plenty of cache."""
    return ServerRecord(
        state="online",
        start=start,
        end=end,
        throughput=throughput,
        dtype="float32",
        quant="none",
        cache_tokens_left=1 << 20,
        max_length=1 << 16,
        version=version,
    )


@dataclasses.dataclass
class PhantomPublisher:
    """`count` phantoms announcing blocks [0, num_blocks) of `prefix`; `publish()` (re)stores their records."""

    initial_peers: list[str]
    prefix: str
    num_blocks: int
    count: int
    throughput: float = 1e9
    ttl_s: float = 300.0

    def __post_init__(self) -> None:
        self.keys = [RSAPrivateKey() for _ in range(self.count)]
        self.peer_ids: list[PeerID] = [peer_id_of(k.get_public_key()) for k in self.keys]
        signer = ManyKeySigner(self.keys) if self.keys else RSASignatureValidator()
        self.dht = start_dht_node(
            self.initial_peers, LOOPBACK, record_validators=make_validators(self.prefix, self.num_blocks, signer)
        )

    def publish(self, count: int | None = None) -> bool:
        """Store the records of the first `count` phantoms (default: all); True if all were stored."""
        record = phantom_record(0, self.num_blocks, self.throughput)
        blocks = list(range(self.num_blocks))
        return all(
            announce_blocks(self.dht, self.prefix, blocks, record, RSASignatureValidator(key), self.ttl_s)
            for key in self.keys[:count]
        )

    def shutdown(self) -> None:
        self.dht.shutdown()
