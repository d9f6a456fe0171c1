"""``swarm-api``: serve a model of the swarm over an OpenAI-compatible HTTP API.

swarm-api MODEL --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/Qm... [--host 127.0.0.1] [--port 8080]
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

from peers.settings import ConfigError, configure_logging, write_ready_file
from swarm.api.config import ApiConfig, load_api_config, read_api_keys

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts: port 0 then has its real number for the ready file."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run_api(config: ApiConfig) -> None:
    """Load the client's part of the model, join the swarm and serve until SIGINT / SIGTERM."""
    import uvicorn
    from transformers import AutoTokenizer

    from swarm import AutoDistributedModelForCausalLM
    from swarm.api.engine import Engine
    from swarm.api.server import create_app

    keys = read_api_keys(config.api_keys) if config.api_keys else None
    chat_template = Path(config.chat_template).read_text() if config.chat_template else None
    sock = bind(config.host, config.port)  # before the slow part: a taken port fails at once
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        config.model,
        initial_peers=config.initial_peers,
        dht_prefix=config.dht_prefix,
        host_maddrs=config.host_maddrs,
        connect_timeout=config.connect_timeout,
        request_timeout=config.request_timeout,
    )
    engine = Engine(model, tokenizer, chat_template, config.max_concurrent_requests)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def ready() -> None:
        if config.ready_file:
            write_ready_file(config.ready_file, {"url": url, "model": config.model_name})
        logger.info(f"serving {config.model_name} at {url}/v1 (metrics: {url}/metrics)")

    app = create_app(engine, config, keys, on_ready=ready)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,  # our logging setup, not uvicorn's
            log_level=config.log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )
    # After its graceful stop uvicorn re-raises the SIGINT / SIGTERM it caught, to the handler found before it ran:
    # these end the process normally (exit 0, the finally below runs) instead of killing it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()  # done already by the app's shutdown, unless the server failed to start
        sock.close()
        logger.info("stopped")


def api_main(argv: list[str] | None = None) -> None:
    try:
        config = load_api_config(argv)
    except ConfigError as e:
        sys.exit(f"swarm-api: error: {e}")
    configure_logging(config.log_level)
    try:
        run_api(config)
    except OSError as e:  # e.g. the port is taken
        sys.exit(f"swarm-api: error: {e}")


if __name__ == "__main__":
    api_main()
