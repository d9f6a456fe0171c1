"""Typed configuration of a peer node and of a bootstrap DHT node.

Each dataclass field is one CLI flag (``--field-name``), one environment variable (``SWARM_PEER_FIELD_NAME`` /
``SWARM_DHT_FIELD_NAME``) and one key of an optional TOML or JSON config file (``--config FILE``).
Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dht.maddrs import MaddrError, parse_announce_maddrs, parse_host_maddrs, parse_initial_peers

DEFAULT_HOST_MADDRS = ["/ip4/0.0.0.0/tcp/0"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default", None)
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DhtNodeConfig:
    """Settings shared by every node that joins the swarm's DHT."""

    initial_peers: list[str] = _opt("multiaddrs of peers already in the swarm", default_factory=list)
    host_maddrs: list[str] = _opt("multiaddrs to listen on", default_factory=lambda: list(DEFAULT_HOST_MADDRS))
    announce_maddrs: list[str] = _opt("multiaddrs to tell others (e.g. a public address)", default_factory=list)
    identity_path: str | None = _opt("private key file: a stable peer ID (created if missing)")
    ready_file: str | None = _opt("write a JSON file with peer_id and maddrs once ready")
    log_level: str = _opt("logging level", default="INFO")

    def check_maddrs(self) -> None:
        """Parse every multiaddr setting now (rules: dht.maddrs), keeping their canonical text: a bad one is a
        one-line error here, before torch is imported or a libp2p daemon starts, not a daemon traceback later."""
        self.initial_peers = checked_maddrs(parse_initial_peers, self.initial_peers, "--initial-peers")
        self.host_maddrs = checked_maddrs(parse_host_maddrs, self.host_maddrs, "--host-maddrs")
        self.announce_maddrs = checked_maddrs(parse_announce_maddrs, self.announce_maddrs, "--announce-maddrs")


@dataclass
class PeerConfig(DhtNodeConfig):
    """A peer node serving a span of blocks."""

    model: str = _opt("checkpoint directory or hub id", default="", positional=True)
    new_swarm: bool = _opt("start a new swarm instead of joining one", default=False)
    blocks: str | None = _opt("serve blocks A:B (end exclusive)")
    num_blocks: int | None = _opt("serve N blocks, choosing the span automatically")
    quant: str = _opt("weight quantization", default="none", choices=("none", "int8", "nf4"))
    dtype: str = _opt("compute dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    device: str = _opt("torch device (cpu, cuda, cuda:N); default: cuda if available", default="auto")
    dht_prefix: str | None = _opt("DHT key prefix; default: the model's name")
    public_name: str | None = _opt("a name shown to others (e.g. your handle)")
    max_length: int = _opt("max tokens (prompt + generated) of one inference session", default=2048)
    cache_tokens: int = _opt("KV-cache budget in tokens (batch x length, summed over sessions)", default=32768)
    max_batch: int = _opt("max batch size of one request", default=32)
    max_sessions: int = _opt("max concurrent inference sessions", default=64)
    max_forward_tokens: int = _opt("max batch x length of one whole-sequence forward", default=65536)
    max_message_bytes: int = _opt("max size of one request message", default=256 * 1024**2)
    max_backward_tokens: int = _opt("max batch x length of one backward (training) request", default=16384)
    max_lora_rank: int = _opt("max rank of client-sent LoRA adapters", default=64)
    max_prompt_length: int = _opt("max length of client-sent deep prompts", default=256)
    max_held_tokens: int = _opt(
        "max tokens (summed over training calls) whose autograd graphs are kept between a forward and its backward; "
        "beyond it, clients fall back to the backward call that recomputes the forward",
        default=16384,
    )
    train_hold_timeout: float = _opt("seconds a training call's graph is kept waiting for its gradient", default=60.0)
    session_idle_timeout: float = _opt("close a session idle for this many seconds", default=600.0)
    announce_period: float = _opt("seconds between DHT record refreshes", default=30.0)
    record_ttl: float = _opt("seconds a DHT record stays valid without refresh", default=90.0)
    inline_compute_tokens: int = _opt(
        "steps of at most this many tokens (batch x length) run on the network thread, larger ones on a compute thread",
        default=16,
    )
    num_threads: int = _opt("torch compute threads (0: all cores)", default=0)
    rebalance_period: float = _opt(
        "with --num-blocks: seconds between checks whether another span would serve the swarm much better "
        "(jittered by +-50%%); 0: never move",
        default=120.0,
    )
    balance_quality: float = _opt(
        "move only if the weakest block's coverage now is below this fraction of what it would be after moving",
        default=0.75,
    )
    throughput_cache: str = _opt(
        "file caching this machine's measured compute throughput per setup ('' to measure at every start)",
        default=str(Path.home() / ".cache" / "blockswarm" / "throughput.json"),
    )

    def validate(self) -> PeerConfig:
        _check_log_level(self.log_level)
        _check_choices(self)
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
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.inline_compute_tokens < 0 or self.num_threads < 0:
            raise ConfigError("--inline-compute-tokens and --num-threads must be >= 0")
        if self.max_held_tokens < 0:
            raise ConfigError("--max-held-tokens must be >= 0")
        for name in ("session_idle_timeout", "announce_period", "record_ttl", "train_hold_timeout"):
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
        _check_log_level(self.log_level)
        self.check_maddrs()
        return self


def checked_maddrs(parse: Callable[[list[str], str], list[str]], values: list[str], flag: str) -> list[str]:
    """`values` through one of dht.maddrs' parsers, its error turned into a ConfigError (which the CLIs print)."""
    try:
        return parse(values, flag)
    except MaddrError as e:
        raise ConfigError(str(e)) from None


def _check_log_level(level: str) -> None:
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")


def _check_choices(config: Any) -> None:
    """Choices hold for values from the environment and config files too, not only for flags."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(
                f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(config, f.name)!r}"
            )


def _check_join(config: PeerConfig) -> None:
    if config.new_swarm and config.initial_peers:
        raise ConfigError("give either --new-swarm or --initial-peers, not both")
    if not config.new_swarm and not config.initial_peers:
        raise ConfigError("give --initial-peers MADDR ... to join a swarm, or --new-swarm to start one")


def parse_span(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
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


def _base_type(tp: Any) -> Any:
    """int | None -> int; list[str] -> list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _convert(name: str, tp: Any, value: Any) -> Any:
    base = _base_type(tp)
    try:
        if base is list:
            return value.split() if isinstance(value, str) else list(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if base in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # TOML/JSON true is not a number
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {base.__name__}") from None


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML or JSON file with settings (keys are the flag names)")
    types_ = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, base = f.metadata, _base_type(types_[f.name])
        kwargs: dict[str, Any] = {"help": meta.get("help"), "default": argparse.SUPPRESS}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="?", **kwargs)
            continue
        if base is bool:
            kwargs["action"] = "store_true"
        elif base is list:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = base
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: settings must be a table of key = value pairs")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_config(cls: type, argv: list[str] | None, env_prefix: str, prog: str, description: str):
    """Merge defaults, config file, environment and command line into a validated `cls` instance."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    types_ = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_path := args.pop("config", None) or os.environ.get(f"{env_prefix}CONFIG"):
        for key, value in _read_config_file(config_path).items():
            if key not in names:
                raise ConfigError(f"{config_path}: unknown setting {key!r}")
            values[key] = _convert(key, types_[key], value)
    for name in names:
        env_value = os.environ.get(env_prefix + name.upper())
        if env_value is not None:
            values[name] = _convert(name, types_[name], env_value)
    values.update(args)
    return cls(**values).validate()
