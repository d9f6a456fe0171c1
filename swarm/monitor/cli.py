"""``swarm-monitor``: watch a swarm and serve its health page, JSON state and Prometheus metrics.

swarm-monitor --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/Qm... [--port 8000] [--host 127.0.0.1]
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

from peers.settings import ConfigError, configure_logging, write_ready_file
from swarm.monitor.config import MonitorConfig, load_monitor_config

logger = logging.getLogger(__name__)


def page_settings(config: MonitorConfig) -> dict[str, Any]:
    """The settings the page and API users need to read the state (the rest stays private to the monitor)."""
    return {
        "scrape_period_s": config.scrape_period,
        "page_refresh_s": config.page_refresh,
        "rtt_timeout_s": config.rtt_timeout,
        "history_window_s": config.history_window,
        "history_buckets": config.history_buckets,
        "models": list(config.models),
    }


def run_monitor(config: MonitorConfig, stop: threading.Event) -> None:
    """Serve until `stop` is set: the first look at the swarm happens before the web server reports ready."""
    from swarm.monitor.collector import Monitor
    from swarm.monitor.server import MonitorHTTPServer
    from swarm.monitor.state import state_json
    from swarm.monitor.store import HistoryStore

    store = HistoryStore(config.db_path, config.history_retention)
    monitor = Monitor(config, store)  # joins the DHT from this (main) thread: its process then dies with ours
    settings = page_settings(config)

    def state() -> dict[str, Any] | None:
        snapshot = monitor.latest()
        return None if snapshot is None else state_json(snapshot, settings)

    server = None
    threads: list[threading.Thread] = []
    try:
        server = MonitorHTTPServer((config.host, config.port), state, monitor.metrics.render)
        monitor.scrape_once()
        threads = [
            threading.Thread(target=monitor.run, args=(stop,), name="swarm-monitor-scrape", daemon=True),
            threading.Thread(target=server.serve_forever, name="swarm-monitor-http", daemon=True),
        ]
        for thread in threads:
            thread.start()
        if config.ready_file:
            write_ready_file(config.ready_file, {"url": server.url, "peer_id": monitor.dht.peer_id.to_base58()})
        logger.info(
            f"swarm monitor serving {server.url} (JSON: {server.url}api/v1/state, metrics: {server.url}metrics)"
        )
        stop.wait()
    finally:
        if server is not None:
            if threads:  # shutdown() waits for serve_forever, so only once it runs
                server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=config.dht_timeout + config.rtt_timeout)
        monitor.shutdown()
        store.close()
    logger.info("stopped")


def monitor_main(argv: list[str] | None = None) -> None:
    try:
        config = load_monitor_config(argv)
    except ConfigError as e:
        sys.exit(f"swarm-monitor: error: {e}")
    configure_logging(config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_monitor(config, stop)
    except OSError as e:  # e.g. the port is taken
        sys.exit(f"swarm-monitor: error: {e}")


if __name__ == "__main__":
    monitor_main()
