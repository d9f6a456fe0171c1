"""Command-line entry points: ``swarm-peer`` (serve blocks) and ``swarm-dht`` (a bootstrap DHT node)."""

from __future__ import annotations

import asyncio
import signal
import sys

from blocks.checkpoint import CheckpointError
from blocks.families import UnsupportedModelError
from dht.records import InvalidPrefixError
from peers.config import ConfigError, DhtConfig, PeerConfig, load_config


def _ignore_stop_signals() -> None:
    """Shutdown is done once the event loop returns; a repeated Ctrl-C / SIGTERM must not turn exit 0 into a kill."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def peer_main(argv: list[str] | None = None) -> None:
    try:
        config = load_config(
            PeerConfig, argv, "SWARM_PEER_", "swarm-peer", "Serve a span of a model's transformer blocks to the swarm."
        )
    except ConfigError as e:
        sys.exit(f"swarm-peer: error: {e}")
    from peers.runner import serve_peer, setup_process

    setup_process(config, config.num_threads)
    try:
        asyncio.run(serve_peer(config))
    except (ConfigError, CheckpointError, UnsupportedModelError, InvalidPrefixError) as e:
        sys.exit(f"swarm-peer: error: {e}")
    _ignore_stop_signals()


def dht_main(argv: list[str] | None = None) -> None:
    try:
        config = load_config(
            DhtConfig,
            argv,
            "SWARM_DHT_",
            "swarm-dht",
            "Run a DHT node that helps peers and clients find each other (serves no blocks).",
        )
    except ConfigError as e:
        sys.exit(f"swarm-dht: error: {e}")
    from peers.runner import serve_dht, setup_process

    setup_process(config)
    asyncio.run(serve_dht(config))
    _ignore_stop_signals()
