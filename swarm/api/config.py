"""Typed configuration of ``swarm-api``: each field is a flag, an env var ``SWARM_API_<NAME>`` and a key of an
optional TOML or JSON file (``--config``), with the same precedence as the other commands' (see peers.settings).

Nothing here imports torch: a bad setting is refused in a fraction of a second.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from peers.settings import ConfigError, check_log_level, check_swarm_service, load_config, option

# OpenAI's own limit on stop sequences; more would only cost a scan per token.
MAX_STOP_SEQUENCES = 4


@dataclass
class ApiConfig:
    """An OpenAI-compatible HTTP endpoint whose model runs in the swarm."""

    model: str = option(
        "checkpoint directory or hub id: its embeddings, LM head, tokenizer and chat template are loaded here, "
        "its blocks are served by the swarm",
        default="",
        positional=True,
    )
    initial_peers: list[str] = option("multiaddrs of any peers of the swarm (required)", default_factory=list)
    host_maddrs: list[str] = option(
        "multiaddrs the endpoint's DHT client listens on", default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"]
    )
    dht_prefix: str | None = option("DHT prefix of the model (default: the model's name, as the peers derive it)")
    served_model_name: str | None = option(
        "the model's name in the API (the 'model' field); default: the last part of MODEL"
    )
    chat_template: str | None = option(
        "Jinja chat template file, used instead of the tokenizer's (for a tokenizer that has none)"
    )
    host: str = option("address the HTTP server binds to", default="127.0.0.1")
    port: int = option("HTTP port (0: any free port; see --ready-file)", default=8080)
    api_keys: str | None = option(
        "file of accepted bearer keys, one per line ('#' comments); without it any client is served"
    )
    insecure_public: bool = option(
        "allow binding to a non-loopback address without --api-keys (anyone who reaches it can use the swarm)",
        default=False,
    )
    ready_file: str | None = option("write a JSON file with the endpoint's URL once serving")
    max_concurrent_requests: int = option(
        "completions generated at the same time; one more is refused with 429", default=8
    )
    max_prompt_tokens: int = option("longest prompt (after the chat template) in tokens; longer: 400", default=1024)
    max_tokens_limit: int = option("largest max_tokens a request may ask for; larger: 400", default=512)
    default_max_tokens: int = option("max_tokens of a request that gives none", default=128)
    max_body_bytes: int = option("largest request body; larger: 413", default=1024**2)
    connect_timeout: float = option("seconds to open a session with one peer", default=20.0)
    request_timeout: float = option("seconds for one step's answer from one peer", default=60.0)
    log_level: str = option("logging level", default="INFO")

    def validate(self) -> ApiConfig:
        check_log_level(self.log_level)
        if not self.model:
            raise ConfigError("give MODEL: the checkpoint directory or hub id of the model the swarm serves")
        check_swarm_service(self)
        for name in (
            "max_concurrent_requests",
            "max_prompt_tokens",
            "max_tokens_limit",
            "default_max_tokens",
            "max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError("--default-max-tokens must be at most --max-tokens-limit")
        for name in ("connect_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("--served-model-name must not be empty")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"--chat-template: no such file {self.chat_template}")
        if self.api_keys is not None:
            read_api_keys(self.api_keys)  # a missing or empty file is an error now, not at the first request
        elif not is_loopback(self.host) and not self.insecure_public:
            raise ConfigError(
                f"--host {self.host} is reachable from other machines: give --api-keys FILE, "
                "or --insecure-public to serve anyone who reaches it"
            )
        return self

    @property
    def model_name(self) -> str:
        """The model's name in the API."""
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def read_api_keys(path: str) -> frozenset[str]:
    """The keys of an --api-keys file: one per line, blank lines and '#' comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-keys: cannot read {path}: {e}") from None
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError(f"--api-keys: {path} holds no key")
    for key in keys:
        if len(key) < 16 or any(c.isspace() for c in key):
            raise ConfigError(f"--api-keys: keys must be at least 16 characters without spaces ({path})")
    return keys


def load_api_config(argv: list[str] | None = None) -> ApiConfig:
    return load_config(
        ApiConfig,
        argv,
        "SWARM_API_",
        "swarm-api",
        "Serve a model of the swarm over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).",
    )
