"""Start-up and shutdown of a peer node: join the DHT, pick and load blocks, serve them, keep announcing."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

import peers
from blocks.checkpoint import model_name_of, open_checkpoint
from blocks.quantization import weight_bytes_report
from blocks.span import load_span
from dht.announce import announce_blocks, fetch_block_servers
from dht.identity import load_or_create_identity
from dht.node import start_dht_node
from dht.records import ServerRecord, check_prefix, make_validators
from peers.config import ConfigError, DhtConfig, DhtNodeConfig, PeerConfig, parse_span
from peers.handlers import BlockService
from peers.placement import choose_span, coverage
from peers.sessions import CacheBudget
from peers.throughput import measure_decode_throughput
from peers.validation import Limits

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
OFFLINE_ANNOUNCE_TIMEOUT = 10.0  # seconds; a peer that cannot reach the DHT still exits promptly


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived while the peer was still starting."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, target)


def start_dht(config: DhtNodeConfig, identity_path: str, validators: list | None = None) -> DHT:
    return start_dht_node(
        config.initial_peers, config.host_maddrs, config.announce_maddrs, identity_path, validators, client_mode=False
    )


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _install_stop_handlers(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def pick_blocks(config: PeerConfig, dht: DHT, prefix: str, num_blocks: int) -> tuple[int, int]:
    if config.blocks is not None:
        start, end = parse_span(config.blocks)
        if end > num_blocks:
            raise ConfigError(f"--blocks {config.blocks}: the model has only {num_blocks} blocks")
        return start, end
    length = config.num_blocks or num_blocks
    servers = fetch_block_servers(dht, prefix, range(num_blocks))
    spans = {
        (s.peer_id, s.record.start, s.record.end)
        for found in servers.values()
        for s in found
        if s.record.state != "offline"
    }
    counts = coverage(num_blocks, [(a, b) for _, a, b in spans])
    start, end = choose_span(num_blocks, length, counts)
    logger.info(f"chose blocks {start}:{end} (servers per block before: {counts})")
    return start, end


async def serve_peer(config: PeerConfig) -> None:
    loop = asyncio.get_running_loop()
    device = _resolve_device(config.device)
    dtype = _DTYPES[config.dtype]
    ckpt = await loop.run_in_executor(None, lambda: open_checkpoint(config.model, blocks=()))  # config only
    prefix = check_prefix(config.dht_prefix or model_name_of(config.model))
    identity = load_or_create_identity(config.identity_path)
    signer = RSASignatureValidator(identity.private_key)
    # Started from the main thread, before our signal handlers exist, so the DHT process inherits neither.
    dht = start_dht(config, str(identity.path), make_validators(prefix, ckpt.num_blocks, signer))
    stop = _install_stop_handlers(loop)

    def check_stop(*_: Any) -> None:
        if stop.is_set():
            raise StopRequested

    service: BlockService | None = None
    span = None
    announced = False
    try:
        start, end = await loop.run_in_executor(None, pick_blocks, config, dht, prefix, ckpt.num_blocks)
        check_stop()
        # Now that the span is known, make sure its shards are present (fetches only those from the hub).
        ckpt = await loop.run_in_executor(None, lambda: open_checkpoint(config.model, blocks=range(start, end)))
        budget = CacheBudget(config.cache_tokens, config.max_sessions)

        throughput = 0.0
        blocks = list(range(start, end))

        async def announce(state: str, timeout: float = config.announce_period) -> None:
            """Sign and store this peer's record for every block it serves, in `state`."""
            record = ServerRecord(
                state=state,
                start=start,
                end=end,
                throughput=float(throughput),
                dtype=config.dtype,
                quant=config.quant,
                cache_tokens_left=budget.tokens_left,
                max_length=config.max_length,
                version=VERSION,
                public_name=config.public_name,
            )
            await loop.run_in_executor(
                None, announce_blocks, dht, prefix, blocks, record, signer, config.record_ttl, timeout
            )

        await announce("joining")
        announced = True
        span = await loop.run_in_executor(
            None, lambda: load_span(ckpt, start, end, dtype, config.quant, device, progress=True, on_block=check_stop)
        )
        throughput = await loop.run_in_executor(None, measure_decode_throughput, span)
        check_stop()
        weights = weight_bytes_report(span)
        logger.info(
            f"linear weights of blocks {start}:{end}: {weights['weight_bytes'] / 2**20:.2f} MiB "
            f"({weights['ratio_vs_fp16']:.3f}x of float16)"
        )
        logger.info(
            f"blocks {start}:{end} loaded ({config.quant}, {config.dtype}, {device}); "
            f"decode throughput {throughput:.1f} tokens/s"
        )
        limits = Limits(
            start,
            end,
            span.hidden_size,
            config.max_length,
            config.max_batch,
            config.max_forward_tokens,
            config.max_message_bytes,
        )
        info = dict(
            model=model_name_of(config.model),
            dht_prefix=prefix,
            start=start,
            end=end,
            dtype=config.dtype,
            quant=config.quant,
            max_length=config.max_length,
            max_batch=config.max_batch,
            version=VERSION,
            public_name=config.public_name,
            weights=weights,
        )
        service = BlockService(span, limits, budget, config.session_idle_timeout, info, config.inline_compute_tokens)
        p2p = await dht.replicate_p2p()
        await service.start(p2p)
        await announce("online")
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        if config.ready_file:
            write_ready_file(
                config.ready_file, {"peer_id": dht.peer_id.to_base58(), "maddrs": maddrs, "blocks": [start, end]}
            )
        logger.info(f"serving blocks {start}:{end} of {prefix} as {dht.peer_id}; maddrs: {maddrs}")

        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=config.announce_period)
            except TimeoutError:
                try:
                    await announce("online")
                except Exception as e:  # a DHT hiccup must not take the peer down; the next refresh retries
                    logger.warning(f"refreshing the DHT records failed: {e!r}")
    except StopRequested:
        logger.info("stop requested during start-up")
    finally:
        if announced:
            logger.info("shutting down: announcing offline")
            try:
                await announce("offline", timeout=OFFLINE_ANNOUNCE_TIMEOUT)
            except Exception as e:  # still shut down cleanly: the records expire on their own
                logger.warning(f"could not announce going offline: {e!r}")
        if config.ready_file and os.path.exists(config.ready_file):
            os.remove(config.ready_file)  # a ready file means "serving now"
        if service is not None:
            await service.stop()
            service.span = None
        span = None  # drop the last reference to the weights before collecting
        dht.shutdown()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("stopped")


async def serve_dht(config: DhtConfig) -> None:
    loop = asyncio.get_running_loop()
    identity = load_or_create_identity(config.identity_path)
    # Without the models' schemas a bootstrap node still refuses writes under another peer's signed subkey.
    dht = start_dht(config, str(identity.path), [RSASignatureValidator(identity.private_key)])
    stop = _install_stop_handlers(loop)
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
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s [%(levelname)s] [%(name)s] %(message)s",
        datefmt="%b %d %H:%M:%S",
    )
    if num_threads:
        torch.set_num_threads(num_threads)
    logging.getLogger(peers.__name__).setLevel(config.log_level.upper())
