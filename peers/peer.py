"""A peer node's lifecycle: join the DHT, pick a span, load and serve it, keep announcing it, move, leave.

:class:`Peer` holds the node's state (its span, the loaded weights, the BlockService, the DHT) in attributes; each
method is one step of the lifecycle. The decisions themselves (which span, whether to move) are the pure functions
of peers.placement over a fresh read of the swarm's records.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

from blocks.checkpoint import Checkpoint, model_name_of, open_checkpoint
from blocks.dtypes import DTYPES
from blocks.fingerprint import span_fingerprint
from blocks.quantization import weight_bytes_report
from blocks.span import BlockSpan, load_span
from dht.announce import announce_blocks, fetch_block_servers
from dht.identity import load_or_create_identity
from dht.models import ModelRecord, announce_model, registry_validator
from dht.records import ServerRecord, ServerState, check_prefix, make_validators, peer_announcements
from peers.config import PeerConfig, check_span_fits
from peers.direct import DirectListener, DirectSettings, direct_hosts
from peers.handlers import BlockService
from peers.placement import choose_span, effective_throughputs, plan_move, spans_of_others, throughput_coverage
from peers.quotas import ClientQuotas, Resource
from peers.runner import install_stop_handlers, start_dht
from peers.scheduler import BatchSettings
from peers.sessions import CacheBudget
from peers.settings import write_ready_file
from peers.throughput import cached_throughput, measure_decode_throughput, throughput_cache_key, warm_up
from peers.wire.validation import Limits

logger = logging.getLogger(__name__)
VERSION = importlib.metadata.version("blockswarm")  # announced in records and info: pyproject.toml's, as installed
OFFLINE_ANNOUNCE_TIMEOUT = 10.0  # seconds; a peer that cannot reach the DHT still exits promptly
T = TypeVar("T")


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived while the peer was still starting."""


def resolve_device(name: str) -> str:
    """'auto' is CUDA where there is a GPU, else the CPU; any other name is torch's."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Peer:
    """One peer node, from joining the DHT to leaving it.

    run() drives the lifecycle: join -> pick_blocks -> bring_up -> serve -> (move -> bring_up -> serve)* ->
    shut_down. SIGINT/SIGTERM end serve(), or stop a start-up at its next check (StopRequested); either way the
    peer announces itself offline, stops serving and leaves the DHT.
    """

    # set by join()
    loop: asyncio.AbstractEventLoop
    ckpt: Checkpoint  # re-opened by load() with the shards of the span
    prefix: str
    signer: RSASignatureValidator
    dht: DHT
    model_record: ModelRecord
    stop: asyncio.Event

    def __init__(self, config: PeerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.name = model_name_of(config.model)
        self.budget = CacheBudget(config.cache_tokens, config.max_sessions)
        self.movable = config.blocks is None and config.rebalance_period > 0
        self.start, self.end = 0, 0  # the span [start, end) being served or brought up
        self.throughput = 0.0  # tokens/s through the span; 0 until measured
        self.weights: str | None = None  # fingerprint of the span's weights (blocks.fingerprint), once known
        self.span: BlockSpan | None = None
        self.service: BlockService | None = None
        self.announced = False  # this peer's records may be in the DHT: it announces offline when it leaves

    # ---- lifecycle ----

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM, moving to other blocks when the swarm needs them more."""
        await self.join()
        try:
            self.start, self.end = await self._in_thread(self.pick_blocks)
            self.check_stop()
            while True:
                await self.bring_up()
                target = await self.serve()
                if target is None:
                    break
                await self.move(target)
        except StopRequested:
            logger.info("stop requested during start-up")
        finally:
            await self.shut_down()
        logger.info("stopped")

    async def join(self) -> None:
        """Read the model's config, join the DHT with this model's validators, then catch SIGINT/SIGTERM."""
        config = self.config
        self.loop = asyncio.get_running_loop()
        self.ckpt = await self._in_thread(lambda: open_checkpoint(config.model, blocks=()))  # config only
        self.prefix = check_prefix(config.dht_prefix or self.name)
        identity = load_or_create_identity(config.identity_path)
        self.signer = RSASignatureValidator(identity.private_key)
        # Started from the main thread, before our signal handlers exist, so the DHT process inherits neither.
        validators = make_validators(self.prefix, self.ckpt.num_blocks, self.signer) + [registry_validator()]
        self.dht = start_dht(config, str(identity.path), validators)
        # The registry entry lets a monitor find this model (prefix, size) with no prior knowledge of it.
        self.model_record = ModelRecord(
            prefix=self.prefix,
            num_blocks=self.ckpt.num_blocks,
            family=self.ckpt.config.model_type,
            name=self.name[:128],
        )
        self.stop = install_stop_handlers(self.loop)

    async def bring_up(self) -> None:
        """Load blocks [start, end), measure them, serve them and announce them online."""
        weights = await self.load()
        await self.serve_blocks(weights)
        await self.announce("online")
        maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if self.config.ready_file:
            peer_id = self.dht.peer_id.to_base58()
            write_ready_file(
                self.config.ready_file, {"peer_id": peer_id, "maddrs": maddrs, "blocks": [self.start, self.end]}
            )
        logger.info(f"serving blocks {self.start}:{self.end} of {self.prefix} as {self.dht.peer_id}; maddrs: {maddrs}")

    async def serve(self) -> tuple[int, int] | None:
        """Refresh the records until asked to stop (None) or until moving to another span would help the swarm."""
        check_at = self._next_rebalance() if self.movable else math.inf
        announce_at = time.monotonic() + self.config.announce_period
        while not self.stop.is_set():
            if await self._stopped_within(min(announce_at, check_at) - time.monotonic()):
                return None
            if time.monotonic() >= announce_at:
                announce_at = time.monotonic() + self.config.announce_period
                await self._refresh()
            if time.monotonic() >= check_at:
                check_at = self._next_rebalance()
                target = await self._check_rebalance()
                if target is not None:
                    return target
        return None

    async def move(self, target: tuple[int, int]) -> None:
        """Leave the current blocks for `target`, which bring_up then loads and serves."""
        # Every block we leave is served by someone else (plan_move checked a fresh view): going offline here
        # uncovers nothing; open sessions fail over to those peers.
        logger.info(f"moving from blocks {self.start}:{self.end} to {target[0]}:{target[1]}: the swarm needs them more")
        await self.announce("offline", timeout=OFFLINE_ANNOUNCE_TIMEOUT)
        await self.service.suspend()  # open sessions end with an error and fail over; the old weights are freed
        self.span = None
        gc.collect()
        self.start, self.end = target

    async def shut_down(self) -> None:
        """Announce offline (if anything was announced), stop serving, free the weights and leave the DHT."""
        if self.announced:
            logger.info("shutting down: announcing offline")
            try:
                await self.announce("offline", timeout=OFFLINE_ANNOUNCE_TIMEOUT)
            except Exception as e:  # still shut down cleanly: the records expire on their own
                logger.warning(f"could not announce going offline: {e!r}")
        if self.config.ready_file and os.path.exists(self.config.ready_file):
            os.remove(self.config.ready_file)  # a ready file means "serving now"
        if self.service is not None:
            await self.service.stop()
            self.service.span = None
        self.span = None  # drop the last reference to the weights before collecting
        self.dht.shutdown()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- steps ----

    def check_stop(self, *_: Any) -> None:
        """Raise StopRequested once SIGINT/SIGTERM arrived (called between start-up steps and blocks loaded)."""
        if self.stop.is_set():
            raise StopRequested

    async def announce(self, state: ServerState, timeout: float | None = None) -> None:
        """Sign and store this peer's record for every block it serves, in `state` (timeout: the announce period);
        while not leaving, refresh the model's registry entry too."""
        config = self.config
        timeout = config.announce_period if timeout is None else timeout
        record = ServerRecord(
            state=state,
            start=self.start,
            end=self.end,
            throughput=float(self.throughput),
            dtype=config.dtype,
            quant=config.quant,
            cache_tokens_left=self.budget.tokens_left,
            max_length=config.max_length,
            version=VERSION,
            public_name=config.public_name,
            max_batch=config.max_batch,
            max_forward_tokens=config.max_forward_tokens,
            max_backward_tokens=config.max_backward_tokens,
            weights=self.weights,
        )
        blocks = list(range(self.start, self.end))
        await self._in_thread(
            announce_blocks, self.dht, self.prefix, blocks, record, self.signer, config.record_ttl, timeout
        )
        if state != "offline":  # the model still exists when this peer leaves: its entry just expires
            await self._in_thread(announce_model, self.dht, self.model_record, self.signer, config.record_ttl, timeout)

    async def load(self) -> dict[str, Any]:
        """Announce joining, load the span's weights, warm them up and measure (or recall) their throughput;
        returns the weights' memory report."""
        config, start, end = self.config, self.start, self.end
        # Now that the span is known, make sure its shards are present (fetches only those from the hub).
        ckpt = self.ckpt = await self._in_thread(lambda: open_checkpoint(config.model, blocks=range(start, end)))
        self.throughput = 0.0
        # Announced from the first record on: clients of other weights never route to this peer.
        self.weights = await self._in_thread(span_fingerprint, ckpt, start, end)
        await self.announce("joining")
        self.announced = True
        span = self.span = await self._in_thread(
            lambda: load_span(ckpt, start, end, self.dtype, config.quant, self.device, on_block=self.check_stop)
        )
        # One forward first: bitsandbytes re-packs quantized weights on their first CPU forward, and the weight
        # memory reported below should be what the peer serves with, whether or not throughput is measured.
        await self._in_thread(warm_up, span)
        key = throughput_cache_key(span, self.name, config.quant, config.num_threads)
        self.throughput = await self._in_thread(
            cached_throughput, config.throughput_cache, key, lambda: measure_decode_throughput(span)
        )
        self.check_stop()
        weights = weight_bytes_report(span)
        logger.info(
            f"linear weights of blocks {start}:{end}: {weights['weight_bytes'] / 2**20:.2f} MiB "
            f"({weights['ratio_vs_fp16']:.3f}x of float16)"
        )
        logger.info(
            f"blocks {start}:{end} loaded ({config.quant}, {config.dtype}, {self.device}); "
            f"decode throughput {self.throughput:.1f} tokens/s"
        )
        return weights

    async def serve_blocks(self, weights: dict[str, Any]) -> None:
        """Serve the loaded span: start the BlockService the first time, hand it the new span after a move."""
        config = self.config
        limits = self.limits()
        info = dict(
            model=self.name,
            dht_prefix=self.prefix,
            start=self.start,
            end=self.end,
            dtype=config.dtype,
            quant=config.quant,
            max_length=config.max_length,
            max_batch=config.max_batch,
            version=VERSION,
            public_name=config.public_name,
            weights=weights,
        )
        if self.service is None:
            self.service = BlockService(
                self.span,
                limits,
                self.budget,
                config.session_idle_timeout,
                info,
                batch_settings(config),
                client_quotas(config),
                frame_timeout=config.frame_timeout,
                slice_tokens=config.compute_slice_tokens,
                direct=await self.direct_listener(),
            )
            await self.service.start(await self.dht.replicate_p2p())
        else:  # moved: the same handlers now serve the new blocks
            await self.service.resume(self.span, limits, info)

    async def direct_listener(self) -> DirectListener | None:
        """The listener for clients' direct connections (peers.direct), if asked for and there is an address to
        offer."""
        config = self.config
        if not config.direct:
            return None
        visible = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
        listen, public = direct_hosts(
            config.direct_host, config.direct_public_hosts, config.host_maddrs, config.announce_maddrs, visible
        )
        if not public:
            logger.warning("no address to offer clients for direct connections: they will use libp2p streams")
            return None
        settings = DirectSettings(
            listen, config.direct_port, public, config.direct_handshake_timeout, config.direct_max_pending
        )
        return await self._in_thread(DirectListener, settings)  # makes a key pair: not on the event loop

    def limits(self) -> Limits:
        """The request limits of the span being brought up (PeerConfig's, plus the span's own facts)."""
        c = self.config
        return Limits(
            start=self.start,
            end=self.end,
            hidden_size=self.span.hidden_size,
            max_length=c.max_length,
            max_batch=c.max_batch,
            max_forward_tokens=c.max_forward_tokens,
            max_message_bytes=c.max_message_bytes,
            max_backward_tokens=c.max_backward_tokens,
            max_lora_rank=c.max_lora_rank,
            max_prompt_length=c.max_prompt_length,
            max_held_tokens=c.max_held_tokens,
            train_hold_timeout=c.train_hold_timeout,
            max_abs_value=c.max_abs_value,
        )

    # ---- placement (these read the DHT: they run in a thread) ----

    def other_spans(self) -> list[tuple[int, int, float]]:
        """A fresh read of the swarm: the other peers' (start, end, throughput) (rule: placement.spans_of_others)."""
        servers = fetch_block_servers(self.dht, self.prefix, range(self.ckpt.num_blocks))
        return spans_of_others(peer_announcements(servers), self.dht.peer_id)

    def pick_blocks(self) -> tuple[int, int]:
        """--blocks as given; else --num-blocks (default: all) where the swarm needs them most (choose_span)."""
        config, num_blocks = self.config, self.ckpt.num_blocks
        if config.blocks is not None:
            return check_span_fits(config.blocks, num_blocks)
        others = self.other_spans()
        cov = throughput_coverage(num_blocks, others)
        # Our own speed is not measured yet (that needs the blocks): assume a typical peer's.
        own = effective_throughputs([0.0, *(t for _, _, t in others)])[0]
        start, end = choose_span(num_blocks, config.num_blocks or num_blocks, cov, own)
        logger.info(f"chose blocks {start}:{end} (throughput per block before: {[round(c, 1) for c in cov]})")
        return start, end

    def rebalance(self) -> tuple[int, int] | None:
        """A span to move to, read from a fresh view of the swarm, or None to stay (see placement.plan_move)."""
        current = (self.start, self.end)
        own = max(self.throughput, 1e-6)
        return plan_move(self.ckpt.num_blocks, current, self.other_spans(), own, self.config.balance_quality)

    # ---- helpers of serve() ----

    async def _refresh(self) -> None:
        try:
            await self.announce("online")
        except Exception as e:  # a DHT hiccup must not take the peer down; the next refresh retries
            logger.warning(f"refreshing the DHT records failed: {e!r}")

    async def _check_rebalance(self) -> tuple[int, int] | None:
        try:
            target = await self._in_thread(self.rebalance)
        except Exception as e:  # as in _refresh: the next check reads the swarm again
            logger.warning(f"could not check the swarm's block coverage: {e!r}")
            return None
        if target is None:
            logger.info(f"rebalance check: staying on blocks {self.start}:{self.end}")
        return target

    def _next_rebalance(self) -> float:
        # Jitter, so that peers that started together do not all re-plan on the same view at the same moment.
        return time.monotonic() + self.config.rebalance_period * random.uniform(0.5, 1.5)

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for SIGINT/SIGTERM; True if it came."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=max(0.0, seconds))
            return True
        except TimeoutError:
            return False

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run blocking work (DHT calls, loading, measuring) off the event loop, which keeps serving meanwhile."""
        return self.loop.run_in_executor(None, fn, *args)


async def serve_peer(config: PeerConfig) -> None:
    await Peer(config).run()


def client_quotas(config: PeerConfig) -> ClientQuotas:
    """The per-client quotas and the memory budget of the peer's settings (peers.quotas)."""
    per_client = {
        Resource.STREAMS: config.max_client_streams,
        Resource.SESSIONS: config.max_client_sessions,
        Resource.CACHE_TOKENS: config.max_client_cache_tokens,
        Resource.TRAINABLE_BYTES: config.max_client_trainable_bytes,
        Resource.QUEUED_TOKENS: config.max_client_queued_tokens,
        Resource.REQUEST_BYTES: config.max_client_request_bytes,
    }
    return ClientQuotas(per_client, {Resource.STREAMS: config.max_streams}, config.memory_budget)


def batch_settings(config: PeerConfig) -> BatchSettings:
    """The batching limits of the peer's settings (peers.scheduler)."""
    return BatchSettings(
        max_batch_tokens=config.max_batch_tokens,
        max_batch_sessions=config.max_batch_sessions,
        batch_wait=config.batch_wait,
        client_share=config.client_share,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        inline_tokens=config.inline_compute_tokens,
    )
