"""A ``swarm-api`` subprocess (python -m swarm.api) on 127.0.0.1 with a free port: for tests, the benchmark and the
demo."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_process import ServiceProcess  # noqa: E402


class ApiProcess(ServiceProcess):
    def __init__(
        self, model: str | Path, initial_peers: list[str], workdir: Path, args: list[str] | None = None, port: int = 0
    ):
        cli = [str(model), "--initial-peers", *initial_peers, "--port", str(port), *(args or [])]
        super().__init__("swarm.api", "api", workdir, cli)
