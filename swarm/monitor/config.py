"""Typed configuration of ``swarm-monitor``: each field is a flag, an env var ``SWARM_MONITOR_<NAME>`` and a key of
an optional TOML or JSON file (``--config``), with the same precedence as the peer's (see peers.settings)."""

from __future__ import annotations

from dataclasses import dataclass

from peers.config import DEFAULT_HOST_MADDRS
from peers.settings import ConfigError, check_log_level, check_swarm_service, load_config, option


@dataclass
class MonitorConfig:
    """A DHT client that watches the swarm and serves a health page, a JSON API and Prometheus metrics."""

    initial_peers: list[str] = option("multiaddrs of any peers of the swarm (required)", default_factory=list)
    host_maddrs: list[str] = option(
        "multiaddrs the monitor's DHT client listens on", default_factory=lambda: list(DEFAULT_HOST_MADDRS)
    )
    identity_path: str | None = option("private key file: a stable peer ID for the monitor (created if missing)")
    models: list[str] = option(
        "show only these DHT prefixes (default: every model the swarm registers)", default_factory=list
    )
    host: str = option("address the web server binds to", default="127.0.0.1")
    port: int = option("web server port (0: any free port; see --ready-file)", default=8000)
    db_path: str = option("SQLite file with the history (':memory:' keeps none)", default="swarm-monitor.sqlite3")
    ready_file: str | None = option("write a JSON file with the page's URL once serving")
    scrape_period: float = option("seconds between two looks at the swarm", default=30.0)
    dht_timeout: float = option("seconds one DHT lookup may take", default=20.0)
    rtt_timeout: float = option("seconds to wait for a peer's answer to the round-trip probe", default=5.0)
    probe_concurrency: int = option("peers probed at the same time", default=32)
    max_models: int = option("most models shown (a registry entry costs its announcer nothing)", default=32)
    max_blocks: int = option("skip models announced with more blocks than this", default=1024)
    max_peers: int = option("most peers shown and probed per model (the rest are not counted)", default=512)
    history_window: float = option("seconds of history shown on the page and in the API", default=6 * 3600.0)
    history_retention: float = option("seconds of history kept in the SQLite file", default=48 * 3600.0)
    history_buckets: int = option("points of the history timelines", default=72)
    page_refresh: float = option("seconds between two refreshes of the page", default=10.0)
    log_level: str = option("logging level", default="INFO")

    def validate(self) -> MonitorConfig:
        check_log_level(self.log_level)
        check_swarm_service(self)
        for name in ("scrape_period", "dht_timeout", "rtt_timeout", "history_window", "page_refresh"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("probe_concurrency", "max_models", "max_blocks", "max_peers", "history_buckets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.history_window / self.history_buckets < self.scrape_period:
            raise ConfigError(
                "--history-window / --history-buckets must be at least --scrape-period, or timeline points stay empty"
            )
        if self.history_retention < self.history_window:
            raise ConfigError("--history-retention must be at least --history-window, or the page shows a gap")
        if self.models:
            _check_models(self.models)
        return self


def _check_models(models: list[str]) -> None:
    """Each --models entry is a valid DHT prefix (dht.records' rule)."""
    from dht.records import InvalidPrefixError, check_prefix  # imports hivemind (seconds): only when needed

    for prefix in models:
        try:
            check_prefix(prefix)
        except InvalidPrefixError as e:
            raise ConfigError(f"--models: {e}") from None


def load_monitor_config(argv: list[str] | None = None) -> MonitorConfig:
    return load_config(
        MonitorConfig,
        argv,
        "SWARM_MONITOR_",
        "swarm-monitor",
        "Watch a blockswarm swarm: a health page, GET /api/v1/state (JSON) and GET /metrics (Prometheus).",
    )
