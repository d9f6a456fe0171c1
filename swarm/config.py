"""Typed settings of a client session, passed down once from ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from blocks.dtypes import DTYPES
from dht.maddrs import parse_host_maddrs, parse_initial_peers
from privacy.defence import NoiseDefence, parse_privacy


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any peers in the swarm
    dht_prefix: str | None = None  # default: the model's name, as the peers derive it
    connect_timeout: float = 20.0  # seconds to open a stream or session with one peer
    request_timeout: float = 60.0  # seconds for one step / forward answer from one peer
    discovery_timeout: float = 30.0  # seconds to wait until the DHT shows every block served
    wire_dtype: torch.dtype = torch.float32  # dtype of hidden states sent to peers
    max_message_bytes: int = 256 * 1024**2  # refuse larger answers from a peer
    push: bool = True  # peers push each step's output straight to the next peer (False: the client relays it)
    # inference sessions move their steps to a direct TLS connection where the peer offers one (peers.direct,
    # `swarm-peer --direct`); off by default: on loopback with 2 cores it measured no faster than libp2p streams
    direct: bool = False
    push_grace: float = 1.0  # seconds to wait for a pushed step's answer before sending the step directly
    max_prefill_tokens: int = 512  # a longer prompt is sent to a session in chunks of this many tokens
    snapshot_ttl: float = 10.0  # seconds a view of the swarm is reused before asking the DHT again
    refresh_period: float = 5.0  # background refresh of the swarm view and RTT probes every this many s; 0: off
    probe_timeout: float = 2.0  # seconds a background RTT probe to one peer may take
    max_probes: int = 64  # peers probed per background refresh (the least recently measured first)
    # A peer counts only once it has answered: a route waits this long (s) for first probes of peers it never
    # reached (all at once), then routes without those that have not answered; they join when they do. It bounds
    # what announced peers that do not exist (or do not answer) can add to an opening.
    reach_timeout: float = 1.0
    # Throughput (tokens/s through its span) a route counts on for a peer whose compute it never measured, while
    # it measured nobody's (afterwards: the slowest measured peer's); its announced claim counts only up to this.
    unmeasured_throughput: float = 1.0
    max_claim_ratio: float = 10.0  # an announced throughput counts only up to this many times what the client saw
    allowed_peers: list[str] | None = None  # peer IDs (base58) the client may route through; None: any peer
    blocked_peers: list[str] = field(default_factory=list)  # peer IDs never used, e.g. ones you do not trust
    default_rtt: float = 0.005  # assumed round trip (s) to a peer not measured yet, for latency routing
    full_cache_penalty: float = 1.0  # routing cost (s) added for a peer that announced too little free cache
    ban_seconds: float = 2.0  # a peer that failed is avoided this long, doubling with each failure in a row
    max_ban_seconds: float = 120.0
    max_failovers: int = 4  # replacements of failed peers within one step before the step fails
    failover_timeout: float = 5.0  # seconds to find a replacement for a failed peer's blocks
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    max_train_tokens: int = 8192  # whole-sequence forward / backward requests are cut into chunks of this many tokens
    # training: ask the forward's peer to keep the autograd graph until the backward (same call), saving the
    # backward's recomputation; False (or a peer out of room) uses the stateless backward that recomputes
    hold_activations: bool = True
    # blocks run on the client, never shown to a peer: k (the first and last k) or (k_first, k_last)
    local_blocks: int | tuple[int, int] = 0
    # Defence of what is sent to the swarm against inversion by peers (privacy.defence; measured by
    # scripts/privacy_audit.py): "off", "noise" (the default noise multiplier, the audit's best point), a noise
    # multiplier > 0, or a privacy.defence.NoiseDefence
    privacy: str | float | NoiseDefence | None = "off"
    # Spot checks (swarm.spot_checks): this fraction of each span's inference steps, whole-sequence forwards and
    # backwards is also computed by another peer serving the same blocks with the same dtype and quantization, and
    # the outputs compared; a peer caught lying is banned for the client's lifetime. 0 turns checks off.
    check_rate: float = 0.05
    check_tolerance: float | None = None  # relative tolerance; None: per dtype/quant (verification.DEFAULT_TOLERANCES)
    check_seed: int | None = None  # seeds which work is checked (tests, benchmarks); None: unpredictable
    unchecked_penalty: float = 0.002  # routing cost (s) of a peer no check has passed yet: checked peers first
    suspect_penalty: float = 1.0  # routing cost (s) of a peer in an unresolved disagreement
    # generate() outside an inference session redoes a generation this many times after a spot check caught a peer
    # lying in it (the liar is banned by then); inside a session the VerificationError reaches the caller
    verification_retries: int = 1
    # Peers whose records announce no weights fingerprint (blocks.fingerprint; peers of earlier versions) are used
    # unless this is set; peers announcing another fingerprint than the client computes are never used.
    require_weights_fingerprint: bool = False

    def __post_init__(self) -> None:
        # Here, not when the DHT starts: a bad address is a one-line MaddrError (a ValueError) naming the field.
        self.initial_peers = parse_initial_peers(self.initial_peers, "initial_peers")
        self.host_maddrs = parse_host_maddrs(self.host_maddrs, "host_maddrs")
        if self.wire_dtype not in DTYPES.values():
            raise ValueError(f"wire_dtype must be one of {', '.join(DTYPES)}, got {self.wire_dtype}")
        for name in ("connect_timeout", "request_timeout", "discovery_timeout", "snapshot_ttl", "push_grace"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for peer in [*(self.allowed_peers or []), *self.blocked_peers]:
            try:
                PeerID.from_base58(peer)
            except Exception:
                raise ValueError(f"{peer!r} is not a peer ID (base58, as in the peer's /p2p/ multiaddr)") from None
        for name in ("reach_timeout", "unmeasured_throughput", "max_claim_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.refresh_period < 0 or self.probe_timeout <= 0 or self.max_probes < 0:
            raise ValueError("refresh_period and max_probes must be >= 0, probe_timeout > 0")
        if self.max_prefill_tokens < 1 or self.max_message_bytes < 1 or self.max_train_tokens < 1:
            raise ValueError("max_prefill_tokens, max_message_bytes and max_train_tokens must be >= 1")
        if not 0.0 <= self.check_rate <= 1.0:
            raise ValueError(f"check_rate must be in [0, 1], got {self.check_rate}")
        if self.check_tolerance is not None and not 0.0 <= self.check_tolerance < 1.0:
            raise ValueError(f"check_tolerance must be in [0, 1), got {self.check_tolerance}")
        if self.unchecked_penalty < 0 or self.suspect_penalty < 0 or self.verification_retries < 0:
            raise ValueError("unchecked_penalty, suspect_penalty and verification_retries must be >= 0")
        first, last = self.local_split
        if first < 0 or last < 0:
            raise ValueError(f"local_blocks must be >= 0, got {self.local_blocks}")
        parse_privacy(self.privacy)  # a bad value raises PrivacyConfigError (a ValueError) naming the field

    @property
    def defence(self) -> NoiseDefence | None:
        """The `privacy` option as a defence; None when off."""
        return parse_privacy(self.privacy)

    @property
    def local_split(self) -> tuple[int, int]:
        """(first k, last k) blocks run on the client."""
        if isinstance(self.local_blocks, int):
            return self.local_blocks, self.local_blocks
        first, last = self.local_blocks
        return int(first), int(last)
