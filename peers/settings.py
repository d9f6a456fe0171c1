"""What every command (``swarm-peer``, ``swarm-dht``, ``swarm-monitor``) shares about its settings and start-up.

A command's settings are a dataclass whose fields are made with :func:`option`: each field is one CLI flag
(``--field-name``), one environment variable (``<ENV_PREFIX><FIELD_NAME>``) and one key of an optional TOML or JSON
config file (``--config FILE``). Precedence: command line > environment > config file > default. Bad values raise
:class:`ConfigError`, whose message names the setting; the commands print it as their one-line error.

Nothing here imports torch or hivemind: a command refuses a bad setting in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from dht.maddrs import MaddrError, parse_host_maddrs, parse_initial_peers

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s"


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


def option(help: str, **kw: Any) -> Any:
    """A settings field: `help` is the flag's help; `default` or `default_factory` its default (else None);
    `choices` the values it accepts (from every source, see check_choices); `positional=True` makes the flag a
    positional argument."""
    default = kw.pop("default", None)
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def check_log_level(level: str) -> None:
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")


def check_choices(config: Any) -> None:
    """Choices hold for values from the environment and config files too, not only for flags."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(
                f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(config, f.name)!r}"
            )


def checked_maddrs(parse: Callable[[list[str], str], list[str]], values: list[str], flag: str) -> list[str]:
    """`values` through one of dht.maddrs' parsers, its error turned into a ConfigError (which the CLIs print)."""
    try:
        return parse(values, flag)
    except MaddrError as e:
        raise ConfigError(str(e)) from None


def check_swarm_service(config: Any) -> None:
    """The fields every HTTP service that joins a swarm as a DHT client has (the monitor, the API): its
    `initial_peers` and `host_maddrs` parsed (in place) and its HTTP `port` in range."""
    if not config.initial_peers:
        raise ConfigError("give --initial-peers MADDR ... of any peer of the swarm")
    config.initial_peers = checked_maddrs(parse_initial_peers, config.initial_peers, "--initial-peers")
    config.host_maddrs = checked_maddrs(parse_host_maddrs, config.host_maddrs, "--host-maddrs")
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {config.port}")


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
    """The command line of settings class `cls`: one flag per field, none with a default (see load_config)."""
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


def configure_logging(level: str) -> None:
    """The commands' log format, at a level check_log_level accepted."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt="%b %d %H:%M:%S")


def write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, target)
