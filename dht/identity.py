"""One RSA identity per peer: it is the libp2p peer ID and it signs the peer's DHT records.

Because the same key does both, a client can check that a record signed by key K really describes the peer
whose ID is derived from K: no peer can announce blocks under another peer's ID.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey


@dataclass(frozen=True)
class Identity:
    path: Path  # libp2p private key file (protobuf), as p2pd reads it
    private_key: RSAPrivateKey
    peer_id: PeerID


def load_or_create_identity(path: str | os.PathLike | None) -> Identity:
    """Load the identity at `path`, creating it there if missing; None: a fresh one in a private temp dir."""
    if path is None:
        tmp = tempfile.mkdtemp(prefix="blockswarm-id-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        path = Path(tmp) / "identity.key"
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    data = path.read_bytes()
    proto = crypto_pb2.PrivateKey.FromString(data)
    if proto.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"{path}: only RSA identities are supported (they also sign DHT records)")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": proto.data})
    return Identity(path, key, PeerID.from_identity(data))


def peer_id_of(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer ID that belongs to an RSA public key (same derivation as PeerID.from_identity)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))
