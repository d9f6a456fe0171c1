"""Writing and reading the block records of a model through a running hivemind.DHT."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial

from hivemind.dht import DHT, DHTNode
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import DHTExpiration, get_dht_time

from dht.records import BlockServer, ServerRecord, block_key, parse_block_entries

logger = logging.getLogger(__name__)


# These run inside the DHT's own process: module-level so that they can be pickled there.
async def _store(
    _dht: DHT, node: DHTNode, keys: list[str], subkey: bytes, value: dict, exp: float, timeout: float
) -> bool:
    # The timeout applies inside the DHT process, so a caller never waits on a request nobody will finish.
    results = await asyncio.wait_for(
        node.store_many(
            keys=keys,
            subkeys=[subkey] * len(keys),
            values=[value] * len(keys),
            expiration_time=exp,
            num_workers=min(len(keys), 32),
        ),
        timeout,
    )
    return all(results.values())


async def _get(_dht: DHT, node: DHTNode, keys: list[str], timeout: float) -> dict[str, dict]:
    found = await asyncio.wait_for(
        node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=min(len(keys), 32)), timeout
    )
    out: dict[str, dict] = {}
    for key, entry in found.items():
        if entry is None or not isinstance(entry.value, dict):
            out[key] = {}
            continue
        out[key] = {sub: (v.value, v.expiration_time) for sub, v in entry.value.items()}
    return out


def announce_blocks(
    dht: DHT,
    prefix: str,
    blocks: Sequence[int],
    record: ServerRecord,
    signer: RSASignatureValidator,
    ttl_s: float,
    timeout: float = 30.0,
) -> bool:
    """Store `record` for each block under this peer's signed subkey; True if every block was stored somewhere."""
    expiration: DHTExpiration = get_dht_time() + ttl_s
    value = record.to_value()
    keys = [block_key(prefix, b) for b in blocks]

    ok = dht.run_coroutine(
        partial(_store, keys=keys, subkey=signer.local_public_key, value=value, exp=expiration, timeout=timeout)
    )
    if not ok:
        logger.warning(f"could not store the records of blocks {list(blocks)} in the DHT")
    return ok


def fetch_block_servers(
    dht: DHT, prefix: str, blocks: Sequence[int], timeout: float = 30.0
) -> dict[int, list[BlockServer]]:
    """Every valid, unexpired server record for `blocks` (block -> servers)."""
    keys = {block_key(prefix, b): b for b in blocks}

    raw = dht.run_coroutine(partial(_get, keys=list(keys), timeout=timeout))
    now = get_dht_time()
    result = {}
    for key, block in keys.items():
        servers = parse_block_entries(block, raw.get(key, {}))
        result[block] = [s for s in servers if s.expiration > now]
    return result
