"""Command-line entry points: ``swarm-peer`` (serve blocks) and ``swarm-dht`` (a bootstrap DHT node).

Mistakes made at the door are one line on stderr, early: the settings (multiaddrs included), MODEL and --blocks
are checked before torch, transformers or hivemind are imported (seconds, even ten, on a small machine); what only
the full checkpoint tells (the model's family, its weight files) before the DHT starts.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from peers.config import DhtConfig, PeerConfig, check_span_fits
from peers.settings import ConfigError, load_config


def _ignore_stop_signals() -> None:
    """Shutdown is done once the event loop returns; a repeated Ctrl-C / SIGTERM must not turn exit 0 into a kill."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def peek_model_size(model: str) -> int | None:
    """MODEL's number of blocks (num_hidden_layers) from its config.json alone: a local directory's, or a hub id's
    (that one file; an unreachable hub fails at once; HF_HUB_OFFLINE holds). None where config.json does not say:
    blocks.checkpoint.open_checkpoint, run next, has the last word. As there, MODEL is a path if it exists or starts
    with '.', '/' or '~', and a path is never looked up on the hub. Raises ConfigError."""
    path = Path(model)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"MODEL {model} is not a checkpoint directory: it has no config.json")
    elif path.exists() or model.startswith((".", "/", "~")):
        problem = "it is a file" if path.exists() else "it does not exist (a path is never looked up on the hub)"
        raise ConfigError(f"MODEL {model} is not a checkpoint directory: {problem}")
    else:
        # Not hf_hub_download: it retries an unreachable hub for half a minute. snapshot_download asks for the
        # repo's file list first, once, and fails at once. The import takes a second or so, against torch's many.
        from huggingface_hub import snapshot_download

        try:
            config_file = Path(snapshot_download(model, allow_patterns=["config.json"])) / "config.json"
        # Broad on purpose: the hub client raises validation, HTTP, transport and offline errors of unrelated types.
        except Exception as e:
            reason = " ".join(str(e).split()) or type(e).__name__  # its messages span several lines
            raise ConfigError(
                f"MODEL {model!r} is neither a local checkpoint directory nor a model the hub could provide: {reason}"
            ) from None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"MODEL {model}: cannot read its config.json: {e}") from None
    size = config.get("num_hidden_layers") if isinstance(config, dict) else None
    return size if type(size) is int and size > 0 else None


def check_model_early(config: PeerConfig) -> None:
    """MODEL's config.json, and --blocks against its size, with no heavy import. Raises ConfigError."""
    size = peek_model_size(config.model)
    if size is not None and config.blocks is not None:
        check_span_fits(config.blocks, size)


def check_model(config: PeerConfig) -> None:
    """Open MODEL as the peer will (its family, its index of weight files) and check --blocks against its size,
    before the DHT starts. Raises CheckpointError, UnsupportedModelError or ConfigError."""
    from blocks.checkpoint import open_checkpoint

    ckpt = open_checkpoint(config.model, blocks=())
    if config.blocks is not None:
        check_span_fits(config.blocks, ckpt.num_blocks)


def peer_main(argv: list[str] | None = None) -> None:
    try:
        config = load_config(
            PeerConfig, argv, "SWARM_PEER_", "swarm-peer", "Serve a span of a model's transformer blocks to the swarm."
        )
        check_model_early(config)
    except ConfigError as e:
        sys.exit(f"swarm-peer: error: {e}")
    from blocks.checkpoint import CheckpointError
    from blocks.families import UnsupportedModelError
    from dht.records import InvalidPrefixError

    try:
        check_model(config)
    except (ConfigError, CheckpointError, UnsupportedModelError) as e:
        sys.exit(f"swarm-peer: error: {e}")
    import uvloop

    from peers.peer import serve_peer
    from peers.runner import setup_process

    setup_process(config, config.num_threads)
    try:
        # uvloop (libuv, as hivemind's own DHT uses): much less loop overhead per message on the decode path
        uvloop.run(serve_peer(config))
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
    import uvloop

    from peers.runner import serve_dht, setup_process

    setup_process(config)
    uvloop.run(serve_dht(config))
    _ignore_stop_signals()
