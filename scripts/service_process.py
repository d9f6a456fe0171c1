"""A blockswarm service (``python -m swarm.api``, ``python -m swarm.monitor``) run as a subprocess on 127.0.0.1 for
tests, benchmarks and the demo: started with its output in a log file, ready once it has written its ready file
(the URL it serves), stopped with SIGTERM (SIGKILL after a timeout)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, module: str, name: str, workdir: Path, args: list[str]):
        self.name = name
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_file = workdir / f"{name}.log"
        self.args = [sys.executable, "-m", module, *args, "--ready-file", str(self.ready_file)]
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Self:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO
            )
        return self

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_ready(self, timeout: float = 180.0) -> str:
        """The base URL (http://127.0.0.1:PORT) once the service has written its ready file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.url = json.loads(self.ready_file.read_text())["url"]
                return self.url
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return None if self.process is None else self.process.returncode

    def __enter__(self) -> Self:
        self.start().wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
