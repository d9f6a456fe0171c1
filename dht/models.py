"""The model registry: which models (DHT prefixes) a swarm serves, and how many blocks each has.

Block records live under ``{prefix}_block{i}``, so a reader must already know the prefix and the number of blocks.
Every peer therefore also writes one small :class:`ModelRecord` under the well-known key :data:`REGISTRY_KEY`,
subkey = its signing public key (so only it can write that subkey, exactly like its block records). One DHT can
hold several models: each peer's entry names the model it serves, and a monitor finds them all with one lookup.

The key cannot collide with a block key: block keys end in ``_block<N>``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import pydantic.v1 as pydantic  # hivemind's SchemaValidator is built on the pydantic v1 API
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from dht.announce import _get, _store
from dht.records import OwnerSubkey, check_prefix, owner_peer_id

logger = logging.getLogger(__name__)

MODEL_RECORD_VERSION = 1
REGISTRY_NAMESPACE = "blockswarm"
REGISTRY_FIELD = "models"
REGISTRY_KEY = f"{REGISTRY_NAMESPACE}_{REGISTRY_FIELD}"
MAX_NUM_BLOCKS = 4096  # far above any real model; bounds what a reader will look up for one announced model


class ModelRecord(pydantic.BaseModel):
    """One peer's statement "I serve model `prefix`, which has `num_blocks` blocks". Strict types, no extras."""

    record_version: pydantic.StrictInt = MODEL_RECORD_VERSION
    prefix: pydantic.StrictStr
    num_blocks: pydantic.conint(strict=True, ge=1, le=MAX_NUM_BLOCKS)
    family: pydantic.constr(strict=True, max_length=32)  # transformers' model_type, e.g. "llama"
    name: pydantic.constr(strict=True, max_length=128)  # the checkpoint's name (directory or hub repo)

    class Config:
        extra = pydantic.Extra.forbid

    @pydantic.validator("prefix")
    def _prefix_is_valid(cls, prefix: str) -> str:
        return check_prefix(prefix)


class RegistrySchema(pydantic.BaseModel):
    models: Optional[dict[OwnerSubkey, ModelRecord]] = None  # noqa: UP045 (pydantic v1)


def registry_validator() -> SchemaValidator:
    """Schema check of the registry key; hivemind merges it with the block schema of the node's own model."""
    return SchemaValidator(RegistrySchema, allow_extra_keys=True, prefix=REGISTRY_NAMESPACE)


@dataclass(frozen=True)
class ModelEntry:
    """A validated registry entry: `peer_id` says it serves `record.prefix`, until `expiration` (DHT time)."""

    peer_id: PeerID
    record: ModelRecord
    expiration: float


def announce_model(
    dht: DHT, record: ModelRecord, signer: RSASignatureValidator, ttl_s: float, timeout: float = 30.0
) -> bool:
    """Store this peer's registry entry under its signed subkey; True if it was stored somewhere."""
    ok = dht.run_coroutine(
        partial(
            _store,
            keys=[REGISTRY_KEY],
            subkey=signer.local_public_key,
            value=record.dict(),
            exp=get_dht_time() + ttl_s,
            timeout=timeout,
        )
    )
    if not ok:
        logger.warning(f"could not store the registry entry of {record.prefix} in the DHT")
    return ok


def parse_registry_entries(entries: dict[Any, tuple[Any, float]]) -> list[ModelEntry]:
    """Explicitly validate registry entries (subkey -> (value, expiration)); malformed ones are dropped and logged.

    The DHT node that stored them may not run our schema, so the schema is checked again here, and the owner key
    is bound to a peer ID.
    """
    models = []
    for subkey, (value, expiration) in entries.items():
        try:
            peer_id = owner_peer_id(subkey)
            if not isinstance(value, dict):
                raise ValueError(f"registry entry must be a dict, got {type(value).__name__}")
            record = ModelRecord.parse_obj(value)
            if not isinstance(expiration, (int, float)):
                raise ValueError("expiration must be a number")
        except (ValueError, pydantic.ValidationError) as e:
            logger.debug(f"dropping malformed registry entry: {e}")
            continue
        models.append(ModelEntry(peer_id, record, float(expiration)))
    return models


def fetch_models(dht: DHT, timeout: float = 30.0) -> list[ModelEntry]:
    """Every valid, unexpired registry entry in the DHT."""
    raw = dht.run_coroutine(partial(_get, keys=[REGISTRY_KEY], timeout=timeout))
    now = get_dht_time()
    return [m for m in parse_registry_entries(raw.get(REGISTRY_KEY, {})) if m.expiration > now]
