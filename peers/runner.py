"""What a node process needs around its work: logging and threads, its DHT node, stop signals; and the bootstrap
DHT node of ``swarm-dht`` (the peer node itself is peers.peer.Peer)."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

import peers
from dht.budget import StorageBudget
from dht.identity import load_or_create_identity
from dht.node import start_dht_node
from peers.config import DhtConfig, DhtNodeConfig
from peers.settings import configure_logging, write_ready_file

logger = logging.getLogger(__name__)


def start_dht(config: DhtNodeConfig, identity_path: str, validators: list | None = None) -> DHT:
    return start_dht_node(
        config.initial_peers,
        config.host_maddrs,
        config.announce_maddrs,
        identity_path,
        validators,
        client_mode=False,
        storage_budget=storage_budget(config),
    )


def storage_budget(config: DhtNodeConfig) -> StorageBudget:
    return StorageBudget(
        max_value_bytes=config.dht_max_value_bytes,
        max_sender_values=config.dht_max_sender_values,
        max_sender_bytes=config.dht_max_sender_bytes,
        max_values=config.dht_max_values,
        max_bytes=config.dht_max_bytes,
        max_ttl=config.dht_max_ttl,
    )


def install_stop_handlers(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets (install it after the DHT started: its process must not inherit it)."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_dht(config: DhtConfig) -> None:
    loop = asyncio.get_running_loop()
    identity = load_or_create_identity(config.identity_path)
    # Without the models' schemas a bootstrap node still refuses writes under another peer's signed subkey.
    dht = start_dht(config, str(identity.path), [RSASignatureValidator(identity.private_key)])
    stop = install_stop_handlers(loop)
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        if config.ready_file:
            write_ready_file(config.ready_file, {"peer_id": dht.peer_id.to_base58(), "maddrs": maddrs})
        logger.info(f"DHT node {dht.peer_id} running; others can join with --initial-peers {' '.join(maddrs)}")
        await stop.wait()
    finally:
        dht.shutdown()
    logger.info("stopped")


def setup_process(config: DhtNodeConfig, num_threads: int = 0) -> None:
    configure_logging(config.log_level)
    if num_threads:
        torch.set_num_threads(num_threads)
    logging.getLogger(peers.__name__).setLevel(config.log_level.upper())
