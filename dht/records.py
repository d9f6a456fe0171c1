"""Server records: what a peer announces about each block it serves, and how the DHT validates it.

Every block i of a model lives under the DHT key ``f"{prefix}_block{i}"``; each serving peer writes one subkey
there: its signing public key (hivemind's ``[owner:...]`` marker), so hivemind's RSASignatureValidator rejects a
write under that subkey by anyone but the key's owner. The value is a :class:`ServerRecord`, checked by hivemind's
SchemaValidator on every DHT node that knows the model, and parsed again by explicit code on the client
(:func:`parse_block_entries`), which also binds the signing key to the peer ID.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pydantic.v1 as pydantic  # hivemind's SchemaValidator is built on the pydantic v1 API
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator, conbytes
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPublicKey

from blocks.names import DtypeName, QuantMode
from dht.identity import peer_id_of

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
ServerState = Literal["joining", "online", "offline"]
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_OWNER_RE = re.compile(rb"^\[owner:(.+)\]$", re.DOTALL)
OwnerSubkey = conbytes(regex=rb"^\[owner:.+\]$")


class ServerRecord(pydantic.BaseModel):
    """One peer's announcement for one block. Strict types: the DHT schema check allows no conversions."""

    record_version: pydantic.StrictInt = RECORD_VERSION
    state: ServerState
    start: pydantic.conint(strict=True, ge=0)
    end: pydantic.conint(strict=True, ge=1)
    throughput: pydantic.confloat(strict=True, ge=0.0)  # tokens/s through the whole span, measured at start-up
    dtype: DtypeName
    quant: QuantMode
    cache_tokens_left: pydantic.conint(strict=True, ge=0)
    max_length: pydantic.conint(strict=True, ge=1)
    version: pydantic.constr(strict=True, max_length=64)
    public_name: Optional[pydantic.constr(strict=True, max_length=128)] = None  # noqa: UP045 (pydantic v1)
    # Size limits of one request (PeerConfig's): clients cut their batches to them. Optional: records of peers
    # from before they were announced still parse (clients then learn them from a refusal's error).
    max_batch: Optional[pydantic.conint(strict=True, ge=1)] = None  # noqa: UP045 (pydantic v1)
    max_forward_tokens: Optional[pydantic.conint(strict=True, ge=1)] = None  # noqa: UP045 (pydantic v1)
    max_backward_tokens: Optional[pydantic.conint(strict=True, ge=1)] = None  # noqa: UP045 (pydantic v1)
    # Fingerprint of the span's block weights as the peer's checkpoint stores them (blocks.fingerprint): clients use
    # the peer only if it equals the one they compute for this span from their own checkpoint. Optional: records of
    # peers from before it was announced still parse.
    weights: Optional[pydantic.constr(strict=True, regex=r"^[0-9a-f]{32}$")] = None  # noqa: UP045 (pydantic v1)

    class Config:
        extra = pydantic.Extra.forbid

    @pydantic.root_validator(skip_on_failure=True)
    def _span_is_ordered(cls, values: dict[str, Any]) -> dict[str, Any]:
        if values["start"] >= values["end"]:
            raise ValueError(f"empty span [{values['start']}, {values['end']})")
        return values

    def to_value(self) -> dict[str, Any]:
        return self.dict()


class InvalidPrefixError(ValueError):
    pass


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise InvalidPrefixError(f"DHT prefix {prefix!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return prefix


def block_key(prefix: str, block: int) -> str:
    return f"{prefix}_block{block}"


def block_schema(num_blocks: int) -> type[pydantic.BaseModel]:
    """A pydantic model with one field per block key, for hivemind's SchemaValidator."""
    fields = {f"block{i}": (Optional[dict[OwnerSubkey, ServerRecord]], None) for i in range(num_blocks)}  # noqa: UP045
    return pydantic.create_model("SwarmBlocks", **fields)


def make_validators(prefix: str, num_blocks: int, signer: RSASignatureValidator) -> list:
    """Validators every node of this model uses: signatures first (they strip the signature), then the schema."""
    return [signer, SchemaValidator(block_schema(num_blocks), allow_extra_keys=True, prefix=check_prefix(prefix))]


@dataclass(frozen=True)
class BlockServer:
    """A validated entry: `peer_id` serves `block` as part of `record`'s span, until `expiration` (DHT time)."""

    peer_id: PeerID
    block: int
    record: ServerRecord
    expiration: float


def owner_peer_id(subkey: Any) -> PeerID:
    """Peer ID bound to a record's owner subkey; raises ValueError if the subkey is not a valid RSA owner marker."""
    if not isinstance(subkey, bytes):
        raise ValueError(f"subkey must be bytes, got {type(subkey).__name__}")
    return _owner_peer_id(subkey)


@functools.lru_cache(maxsize=4096)
def _owner_peer_id(subkey: bytes) -> PeerID:
    # Cached: a peer's subkey is the same under each of its blocks and at every read, and parsing its RSA key is
    # most of the cost of reading many records (e.g. of peers that announce but do not run).
    match = _OWNER_RE.match(subkey)
    if match is None:
        raise ValueError("subkey is not signed by an owner key")
    return peer_id_of(RSAPublicKey.from_bytes(match.group(1)))


def parse_block_entries(block: int, entries: dict[Any, tuple[Any, float]]) -> list[BlockServer]:
    """Explicitly validate what the DHT returned for one block; malformed entries are dropped and logged.

    `entries` maps subkey -> (value, expiration). The DHT already checked signatures; here we re-check the record
    schema (a node without our schema may have stored anything), bind the owner key to a peer ID, and check that
    the record's span covers the block it was found under.
    """
    servers = []
    for subkey, (value, expiration) in entries.items():
        try:
            peer_id = owner_peer_id(subkey)
            if not isinstance(value, dict):
                raise ValueError(f"record must be a dict, got {type(value).__name__}")
            record = _parse_record(value)
            if not record.start <= block < record.end:
                raise ValueError(f"record span [{record.start}, {record.end}) does not contain block {block}")
            if not isinstance(expiration, (int, float)):
                raise ValueError("expiration must be a number")
        except (ValueError, pydantic.ValidationError) as e:
            logger.debug(f"dropping malformed record for block {block}: {e}")
            continue
        servers.append(BlockServer(peer_id, block, record, float(expiration)))
    return servers


def _parse_record(value: dict) -> ServerRecord:
    """ServerRecord.parse_obj, cached: a peer's record is the same under each of its blocks and at every read. The
    cache key holds each field's type too, so a value is never taken for an equal one of another type (1 == 1.0
    == True), which the strict schema tells apart. Shared results are never modified."""
    try:
        key = tuple(sorted((name, type(v), v) for name, v in value.items()))
        hash(key)
    except TypeError:  # keys that do not sort, or values that do not hash: not a valid record anyway
        return ServerRecord.parse_obj(value)
    return _parse_record_items(key)


@functools.lru_cache(maxsize=4096)
def _parse_record_items(items: tuple) -> ServerRecord:
    return ServerRecord.parse_obj({name: v for name, _, v in items})


def with_weights(
    servers: dict[int, list[BlockServer]], expected: Callable[[int, int], str | None], require: bool = False
) -> tuple[dict[int, list[BlockServer]], set[PeerID]]:
    """Only the entries whose record's weights fingerprint is `expected(start, end)` of the record's span; also the
    peers dropped for announcing another one. A record that announces none (a peer from before fingerprints) is kept
    unless `require`; peers of other weights are never used, whatever else their records say."""
    kept: dict[int, list[BlockServer]] = {}
    dropped: set[PeerID] = set()
    for block, entries in servers.items():
        kept[block] = []
        for entry in entries:
            announced = entry.record.weights
            if announced is None and not require:
                kept[block].append(entry)
            elif announced is not None and announced == expected(entry.record.start, entry.record.end):
                kept[block].append(entry)
            else:
                dropped.add(entry.peer_id)
    return kept, dropped


@dataclass(frozen=True)
class PeerAnnouncement:
    """What one peer announces, merged from its per-block records (see :func:`peer_announcements`)."""

    peer_id: PeerID
    record: ServerRecord  # the freshest of the peer's block records: it stands for the peer
    blocks: tuple[int, ...]  # sorted blocks whose record announces the freshest record's state and span
    start: int  # [start, end): the contiguous run of `blocks` from the first one, the blocks one can route through
    end: int
    expiration: float  # the freshest record's

    @property
    def state(self) -> ServerState:
        return self.record.state


def peer_announcements(servers: dict[int, list[BlockServer]]) -> dict[PeerID, PeerAnnouncement]:
    """Block -> servers, regrouped per peer: one announcement per peer, whatever its state.

    A peer's freshest record (latest expiration; the first found on a tie) is its announcement. Its blocks are those
    whose record has that record's state and span, so records left over from an earlier span or state of the same
    peer (e.g. before a restart or a move) are ignored until they expire. Where a block's record has lapsed, only
    the contiguous run from the first announced block is served as one span (`start`, `end`).
    """
    found: dict[PeerID, list[BlockServer]] = {}
    for entries in servers.values():
        for entry in entries:
            found.setdefault(entry.peer_id, []).append(entry)
    announcements = {}
    for peer_id, entries in found.items():
        freshest = max(entries, key=lambda e: e.expiration)
        claim = _claim(freshest.record)
        blocks = sorted({e.block for e in entries if _claim(e.record) == claim})
        end = blocks[0]
        while end in blocks:
            end += 1
        announcements[peer_id] = PeerAnnouncement(
            peer_id, freshest.record, tuple(blocks), blocks[0], end, freshest.expiration
        )
    return announcements


def _claim(record: ServerRecord) -> tuple[str, int, int]:
    """What records of one announcement share; throughput and free cache change between refreshes."""
    return record.state, record.start, record.end
