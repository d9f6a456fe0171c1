"""Start-up and shutdown of a peer node: join the DHT, pick and load blocks, serve them, keep announcing."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import signal
import tempfile
import time
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
from dht.models import ModelRecord, announce_model, registry_validator
from dht.node import start_dht_node
from dht.records import ServerRecord, check_prefix, make_validators
from peers.config import DhtConfig, DhtNodeConfig, PeerConfig, check_span_fits
from peers.handlers import BlockService
from peers.placement import choose_span, effective_throughputs, plan_move, throughput_coverage
from peers.sessions import CacheBudget
from peers.throughput import cached_throughput, measure_decode_throughput, throughput_cache_key, warm_up
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


def _other_spans(dht: DHT, prefix: str, num_blocks: int) -> list[tuple[int, int, float]]:
    """(start, end, throughput) of every other peer serving this model, unmeasured ones counted as typical."""
    servers = fetch_block_servers(dht, prefix, range(num_blocks))
    spans = {
        s.peer_id: (s.record.start, s.record.end, s.record.throughput)
        for found in servers.values()
        for s in found
        if s.record.state != "offline" and s.peer_id != dht.peer_id
    }
    throughputs = effective_throughputs([t for _, _, t in spans.values()])
    return [(a, b, t) for (a, b, _), t in zip(spans.values(), throughputs, strict=True)]


def pick_blocks(config: PeerConfig, dht: DHT, prefix: str, num_blocks: int) -> tuple[int, int]:
    if config.blocks is not None:
        return check_span_fits(config.blocks, num_blocks)
    length = config.num_blocks or num_blocks
    others = _other_spans(dht, prefix, num_blocks)
    cov = throughput_coverage(num_blocks, others)
    # Our own speed is not measured yet (that needs the blocks): assume a typical peer's.
    own = effective_throughputs([0.0, *(t for _, _, t in others)])[0]
    start, end = choose_span(num_blocks, length, cov, own)
    logger.info(f"chose blocks {start}:{end} (throughput per block before: {[round(c, 1) for c in cov]})")
    return start, end


def rebalance_target(
    config: PeerConfig, dht: DHT, prefix: str, num_blocks: int, current: tuple[int, int], own: float
) -> tuple[int, int] | None:
    """A span to move to, read from a fresh view of the swarm, or None to stay (see placement.plan_move)."""
    others = _other_spans(dht, prefix, num_blocks)
    return plan_move(num_blocks, current, others, max(own, 1e-6), config.balance_quality)


async def serve_peer(config: PeerConfig) -> None:
    loop = asyncio.get_running_loop()
    device = _resolve_device(config.device)
    dtype = _DTYPES[config.dtype]
    ckpt = await loop.run_in_executor(None, lambda: open_checkpoint(config.model, blocks=()))  # config only
    prefix = check_prefix(config.dht_prefix or model_name_of(config.model))
    identity = load_or_create_identity(config.identity_path)
    signer = RSASignatureValidator(identity.private_key)
    # Started from the main thread, before our signal handlers exist, so the DHT process inherits neither.
    validators = make_validators(prefix, ckpt.num_blocks, signer) + [registry_validator()]
    dht = start_dht(config, str(identity.path), validators)
    # The registry entry lets a monitor find this model (prefix, size) with no prior knowledge of it.
    name = model_name_of(config.model)[:128]
    model_record = ModelRecord(prefix=prefix, num_blocks=ckpt.num_blocks, family=ckpt.config.model_type, name=name)
    stop = _install_stop_handlers(loop)

    def check_stop(*_: Any) -> None:
        if stop.is_set():
            raise StopRequested

    service: BlockService | None = None
    span = None
    announced = False
    budget = CacheBudget(config.cache_tokens, config.max_sessions)
    start, end, throughput = 0, 0, 0.0
    movable = config.blocks is None and config.rebalance_period > 0

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
            None, announce_blocks, dht, prefix, list(range(start, end)), record, signer, config.record_ttl, timeout
        )
        if state != "offline":  # the model still exists when this peer leaves: its entry just expires
            await loop.run_in_executor(None, announce_model, dht, model_record, signer, config.record_ttl, timeout)

    async def bring_up() -> None:
        """Load blocks [start, end), measure them, serve them and announce them online."""
        nonlocal ckpt, span, throughput, announced, service
        # Now that the span is known, make sure its shards are present (fetches only those from the hub).
        ckpt = await loop.run_in_executor(None, lambda: open_checkpoint(config.model, blocks=range(start, end)))
        throughput = 0.0
        await announce("joining")
        announced = True
        span = await loop.run_in_executor(
            None, lambda: load_span(ckpt, start, end, dtype, config.quant, device, progress=True, on_block=check_stop)
        )
        # One forward first: bitsandbytes re-packs quantized weights on their first CPU forward, and the weight
        # memory reported below should be what the peer serves with, whether or not throughput is measured.
        await loop.run_in_executor(None, warm_up, span)
        key = throughput_cache_key(span, model_name_of(config.model), config.quant, config.num_threads)
        throughput = await loop.run_in_executor(
            None, cached_throughput, config.throughput_cache, key, lambda: measure_decode_throughput(span)
        )
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
            config.max_backward_tokens,
            config.max_lora_rank,
            config.max_prompt_length,
            config.max_held_tokens,
            config.train_hold_timeout,
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
        if service is None:
            service = BlockService(
                span, limits, budget, config.session_idle_timeout, info, config.inline_compute_tokens
            )
            await service.start(await dht.replicate_p2p())
        else:  # moved: the same handlers now serve the new blocks
            await service.resume(span, limits, info)
        await announce("online")
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        if config.ready_file:
            write_ready_file(
                config.ready_file, {"peer_id": dht.peer_id.to_base58(), "maddrs": maddrs, "blocks": [start, end]}
            )
        logger.info(f"serving blocks {start}:{end} of {prefix} as {dht.peer_id}; maddrs: {maddrs}")

    def next_rebalance() -> float:
        # Jitter, so that peers that started together do not all re-plan on the same view at the same moment.
        return time.monotonic() + config.rebalance_period * random.uniform(0.5, 1.5)

    async def keep_serving() -> tuple[int, int] | None:
        """Refresh the records until asked to stop (None) or until moving to another span would help the swarm."""
        check_at = next_rebalance() if movable else float("inf")
        announce_at = time.monotonic() + config.announce_period
        while not stop.is_set():
            wait = max(0.0, min(announce_at, check_at) - time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
                return None
            except TimeoutError:
                pass
            if time.monotonic() >= announce_at:
                announce_at = time.monotonic() + config.announce_period
                try:
                    await announce("online")
                except Exception as e:  # a DHT hiccup must not take the peer down; the next refresh retries
                    logger.warning(f"refreshing the DHT records failed: {e!r}")
            if time.monotonic() >= check_at:
                check_at = next_rebalance()
                try:
                    target = await loop.run_in_executor(
                        None, rebalance_target, config, dht, prefix, ckpt.num_blocks, (start, end), throughput
                    )
                except Exception as e:
                    logger.warning(f"could not check the swarm's block coverage: {e!r}")
                    continue
                if target is not None:
                    return target
                logger.info(f"rebalance check: staying on blocks {start}:{end}")
        return None

    try:
        start, end = await loop.run_in_executor(None, pick_blocks, config, dht, prefix, ckpt.num_blocks)
        check_stop()
        while True:
            await bring_up()
            target = await keep_serving()
            if target is None:
                break
            # Every block we leave is served by someone else (plan_move checked a fresh view): going offline here
            # uncovers nothing; open sessions fail over to those peers.
            logger.info(f"moving from blocks {start}:{end} to {target[0]}:{target[1]}: the swarm needs them more")
            await announce("offline", timeout=OFFLINE_ANNOUNCE_TIMEOUT)
            await service.suspend()  # open sessions end with an error and fail over; the old weights are freed
            span = None
            gc.collect()
            start, end = target
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
