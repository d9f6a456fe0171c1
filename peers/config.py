"""Typed configuration of a peer node and of a bootstrap DHT node.

Each dataclass field is one CLI flag (``--field-name``), one environment variable (``SWARM_PEER_FIELD_NAME`` /
``SWARM_DHT_FIELD_NAME``) and one key of an optional TOML or JSON config file (``--config FILE``), read by
peers.settings.load_config. Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from blocks.names import DTYPE_NAMES, QUANT_MODES
from dht.maddrs import parse_announce_maddrs, parse_host_maddrs, parse_initial_peers
from peers.settings import ConfigError, check_choices, check_log_level, checked_maddrs, option

DEFAULT_HOST_MADDRS = ["/ip4/0.0.0.0/tcp/0"]


@dataclass
class DhtNodeConfig:
    """Settings shared by every node that joins the swarm's DHT."""

    initial_peers: list[str] = option("multiaddrs of peers already in the swarm", default_factory=list)
    host_maddrs: list[str] = option("multiaddrs to listen on", default_factory=lambda: list(DEFAULT_HOST_MADDRS))
    announce_maddrs: list[str] = option("multiaddrs to tell others (e.g. a public address)", default_factory=list)
    identity_path: str | None = option("private key file: a stable peer ID (created if missing)")
    ready_file: str | None = option("write a JSON file with peer_id and maddrs once ready")
    log_level: str = option("logging level", default="INFO")
    # What other nodes may store in this node's DHT storage (dht.budget); a sender is a remote peer ID.
    dht_max_value_bytes: int = option("max bytes of one value another node stores in this node's DHT", default=65536)
    dht_max_sender_values: int = option(
        "max values (and subkeys) one other node may have stored in this node's DHT at once", default=1024
    )
    dht_max_sender_bytes: int = option(
        "max bytes one other node may have stored in this node's DHT at once", default=4 * 1024**2
    )
    dht_max_values: int = option("max values (and subkeys) all other nodes together may store here", default=65536)
    dht_max_bytes: int = option("max bytes all other nodes together may store in this node's DHT", default=64 * 1024**2)
    dht_max_ttl: float = option(
        "seconds ahead a value stored here by another node may expire (what is stored is gone within it)",
        default=3600.0,
    )

    def check_maddrs(self) -> None:
        """Parse every multiaddr setting now (rules: dht.maddrs), keeping their canonical text: a bad one is a
        one-line error here, before torch is imported or a libp2p daemon starts, not a daemon traceback later."""
        self.initial_peers = checked_maddrs(parse_initial_peers, self.initial_peers, "--initial-peers")
        self.host_maddrs = checked_maddrs(parse_host_maddrs, self.host_maddrs, "--host-maddrs")
        self.announce_maddrs = checked_maddrs(parse_announce_maddrs, self.announce_maddrs, "--announce-maddrs")

    def check_dht_budget(self) -> None:
        for name in ("dht_max_value_bytes", "dht_max_sender_values", "dht_max_sender_bytes", "dht_max_values"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.dht_max_bytes < self.dht_max_sender_bytes or self.dht_max_values < self.dht_max_sender_values:
            raise ConfigError("--dht-max-bytes / --dht-max-values must be at least their per-sender limits")
        if not self.dht_max_ttl > 0:
            raise ConfigError("--dht-max-ttl must be > 0")


@dataclass
class PeerConfig(DhtNodeConfig):
    """A peer node serving a span of blocks."""

    model: str = option("checkpoint directory or hub id", default="", positional=True)
    new_swarm: bool = option("start a new swarm instead of joining one", default=False)
    blocks: str | None = option("serve blocks A:B (end exclusive)")
    num_blocks: int | None = option("serve N blocks, choosing the span automatically")
    quant: str = option("weight quantization", default="none", choices=QUANT_MODES)
    dtype: str = option("compute dtype", default="float32", choices=DTYPE_NAMES)
    device: str = option("torch device (cpu, cuda, cuda:N); default: cuda if available", default="auto")
    dht_prefix: str | None = option("DHT key prefix; default: the model's name")
    public_name: str | None = option("a name shown to others (e.g. your handle)")
    max_length: int = option("max tokens (prompt + generated) of one inference session", default=2048)
    cache_tokens: int = option("KV-cache budget in tokens (batch x length, summed over sessions)", default=32768)
    max_batch: int = option("max batch size of one request", default=32)
    max_sessions: int = option("max concurrent inference sessions", default=64)
    max_forward_tokens: int = option("max batch x length of one whole-sequence forward", default=65536)
    max_message_bytes: int = option("max size of one request message", default=256 * 1024**2)
    max_backward_tokens: int = option("max batch x length of one backward (training) request", default=16384)
    max_lora_rank: int = option("max rank of client-sent LoRA adapters", default=64)
    max_prompt_length: int = option("max length of client-sent deep prompts", default=256)
    max_abs_value: float = option(
        "largest magnitude of any value in a client's tensors (hidden states, gradients, adapters); beyond it a "
        "request could only compute infinities",
        default=1e9,
    )
    max_held_tokens: int = option(
        "max tokens (summed over training calls) whose autograd graphs are kept between a forward and its backward; "
        "beyond it, clients fall back to the backward call that recomputes the forward",
        default=16384,
    )
    train_hold_timeout: float = option("seconds a training call's graph is kept waiting for its gradient", default=60.0)
    session_idle_timeout: float = option("close a session idle for this many seconds", default=600.0)
    frame_timeout: float = option(
        "seconds within which a frame must arrive whole once it began, and a stream's first request once the stream "
        "opened: a stream that stalls mid-message is closed and its file descriptor freed",
        default=60.0,
    )
    max_streams: int = option("max open streams of all clients together (each holds a file descriptor)", default=1024)
    max_client_streams: int = option("max open streams of one client (remote peer ID)", default=64)
    max_client_sessions: int = option("max inference sessions of one client open at once", default=16)
    max_client_cache_tokens: int = option(
        "max KV-cache tokens (batch x max_length, summed) that one client's sessions may reserve", default=16384
    )
    max_client_trainable_bytes: int = option(
        "max bytes of deep prompts and LoRA tensors one client's sessions and requests may keep on this peer",
        default=256 * 1024**2,
    )
    max_client_queued_tokens: int = option(
        "max tokens (batch x length) of one client's computations waiting or running at once; more is refused",
        default=131072,
    )
    max_client_request_bytes: int = option(
        "max bytes one client's messages may hold while read, decoded, computed and answered (4x each frame's length)",
        default=1024**3,
    )
    memory_budget: int = option(
        "bytes that everything held for clients may take in all: messages being read and answered (4x their "
        "length), decoded requests, trainables, held autograd graphs (KV caches have --cache-tokens)",
        default=2 * 1024**3,
    )
    compute_slice_tokens: int = option(
        "a whole-sequence forward is computed in slices of about this many tokens (whole sequences), other "
        "clients' work in between",
        default=4096,
    )
    direct: bool = option(
        "offer clients a direct TLS connection for their inference sessions (off the libp2p daemons; see README)",
        default=False,
    )
    direct_host: str | None = option(
        "IP address the direct-connection listener binds; default: the IP of the first --host-maddrs"
    )
    direct_port: int = option("TCP port of the direct-connection listener (0: any free port)", default=0)
    direct_public_hosts: list[str] = option(
        "IP addresses offered to clients for direct connections; default: the IPs of --announce-maddrs, else the "
        "listen address unless it is a wildcard, else the addresses the libp2p daemon sees",
        default_factory=list,
    )
    direct_handshake_timeout: float = option(
        "seconds within which a direct connection must finish TLS and present its session's ticket", default=10.0
    )
    direct_max_pending: int = option("direct connections that may be waiting for their ticket at once", default=64)
    announce_period: float = option("seconds between DHT record refreshes", default=30.0)
    record_ttl: float = option("seconds a DHT record stays valid without refresh", default=90.0)
    inline_compute_tokens: int = option(
        "a lone step of at most this many tokens (batch x length) runs on the network thread, others on a compute "
        "thread",
        default=16,
    )
    max_batch_tokens: int = option(
        "tokens (batch x length) of the sessions' steps that one batched forward may hold", default=512
    )
    max_batch_sessions: int = option("sessions whose steps one batched forward may hold (1: no batching)", default=32)
    batch_wait: float = option(
        "seconds a batch may wait for other open sessions' steps (at most a quarter of the last batch's compute "
        "time; never when only one session is open; 0: never)",
        default=0.05,
    )
    client_share: float = option(
        "most of a batch's tokens that one client's sessions may take while other clients' steps wait", default=0.5
    )
    prefill_chunk_tokens: int = option(
        "a longer step (a prompt) is computed in chunks of this many tokens, other sessions' steps in between",
        default=256,
    )
    num_threads: int = option("torch compute threads (0: all cores)", default=0)
    rebalance_period: float = option(
        "with --num-blocks: seconds between checks whether another span would serve the swarm much better "
        "(jittered by +-50%%); 0: never move",
        default=120.0,
    )
    balance_quality: float = option(
        "move only if the weakest block's coverage now is below this fraction of what it would be after moving",
        default=0.75,
    )
    throughput_cache: str = option(
        "file caching this machine's measured compute throughput per setup ('' to measure at every start)",
        default=str(Path.home() / ".cache" / "blockswarm" / "throughput.json"),
    )

    def validate(self) -> PeerConfig:
        check_log_level(self.log_level)
        check_choices(self)
        if not self.model:
            raise ConfigError("MODEL is required")
        if self.blocks is not None and self.num_blocks is not None:
            raise ConfigError("give either --blocks or --num-blocks, not both")
        if self.blocks is not None:
            parse_span(self.blocks)
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-blocks must be >= 1, got {self.num_blocks}")
        _check_join(self)
        self.check_maddrs()
        self.check_dht_budget()
        if self.record_ttl > self.dht_max_ttl:
            raise ConfigError("--record-ttl must not exceed --dht-max-ttl, or other nodes refuse this peer's records")
        for name in (
            "max_length",
            "cache_tokens",
            "max_batch",
            "max_sessions",
            "max_forward_tokens",
            "max_message_bytes",
            "max_backward_tokens",
            "max_lora_rank",
            "max_prompt_length",
            "max_batch_tokens",
            "max_batch_sessions",
            "prefill_chunk_tokens",
            "max_streams",
            "max_client_streams",
            "max_client_sessions",
            "max_client_cache_tokens",
            "max_client_trainable_bytes",
            "max_client_queued_tokens",
            "max_client_request_bytes",
            "memory_budget",
            "compute_slice_tokens",
            "direct_max_pending",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.inline_compute_tokens < 0 or self.num_threads < 0:
            raise ConfigError("--inline-compute-tokens and --num-threads must be >= 0")
        if self.max_held_tokens < 0:
            raise ConfigError("--max-held-tokens must be >= 0")
        if not self.max_abs_value > 0:
            raise ConfigError("--max-abs-value must be > 0")
        if self.batch_wait < 0 or not 0 < self.client_share <= 1:
            raise ConfigError("--batch-wait must be >= 0 and --client-share in (0, 1]")
        if self.prefill_chunk_tokens > self.max_batch_tokens:
            raise ConfigError("--prefill-chunk-tokens must not exceed --max-batch-tokens: a chunk must fit a batch")
        _check_direct(self)
        for name in (
            "session_idle_timeout",
            "announce_period",
            "record_ttl",
            "train_hold_timeout",
            "frame_timeout",
            "direct_handshake_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.record_ttl <= self.announce_period:
            raise ConfigError("--record-ttl must be longer than --announce-period, or records lapse between refreshes")
        if self.rebalance_period < 0:
            raise ConfigError("--rebalance-period must be >= 0")
        if not 0 < self.balance_quality <= 1:
            raise ConfigError(f"--balance-quality must be in (0, 1], got {self.balance_quality}")
        return self


@dataclass
class DhtConfig(DhtNodeConfig):
    """A bootstrap node: joins the DHT through --initial-peers, or starts one without them; serves no blocks."""

    def validate(self) -> DhtConfig:
        check_log_level(self.log_level)
        self.check_maddrs()
        self.check_dht_budget()
        return self


def _check_join(config: PeerConfig) -> None:
    if config.new_swarm and config.initial_peers:
        raise ConfigError("give either --new-swarm or --initial-peers, not both")
    if not config.new_swarm and not config.initial_peers:
        raise ConfigError("give --initial-peers MADDR ... to join a swarm, or --new-swarm to start one")


def parse_span(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B."""
    parts = text.split(":")
    # isascii: str.isdigit also accepts superscripts and other scripts' digits, which int() then refuses
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise ConfigError(f"--blocks must look like A:B (e.g. 0:4), got {text!r}")
    start, end = int(parts[0]), int(parts[1])
    if start >= end:
        raise ConfigError(f"--blocks {text}: the start must be below the end")
    return start, end


def check_span_fits(text: str, num_blocks: int) -> tuple[int, int]:
    """'A:B' -> (A, B) as parse_span, and B <= num_blocks: the span lies within the model's blocks."""
    start, end = parse_span(text)
    if end > num_blocks:
        raise ConfigError(f"--blocks {text}: the model has only {num_blocks} blocks (0:{num_blocks} is all of them)")
    return start, end


def _check_direct(config: PeerConfig) -> None:
    if not 0 <= config.direct_port < 65536:
        raise ConfigError(f"--direct-port must be in [0, 65535], got {config.direct_port}")
    for name, hosts in (("--direct-host", [config.direct_host] if config.direct_host else []),
                        ("--direct-public-hosts", config.direct_public_hosts)):  # fmt: skip
        for host in hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"{name}: {host!r} is not an IP address") from None
