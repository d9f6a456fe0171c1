"""The monitor's web server (standard library, one thread per request): the page, its JSON and the metrics.

    GET /                     the health page (static HTML + JS; the JS renders the JSON below)
    GET /static/<file>        its script and style sheet
    GET /api/v1/state         the swarm's state as JSON (schema: GET /api/v1/schema)
    GET /api/v1/schema        the JSON Schema of /api/v1/state
    GET /metrics              Prometheus exposition

Peer-announced text reaches the browser only inside JSON, and the page's script puts it into the document with
textContent. The Content-Security-Policy allows scripts from this origin's files only, so even markup that
slipped into the document could not run a script.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

_PACKAGE = resources.files("swarm.monitor")
STATIC_FILES = {
    "/": ("static/index.html", "text/html; charset=utf-8"),
    "/static/monitor.js": ("static/monitor.js", "text/javascript; charset=utf-8"),
    "/static/monitor.css": ("static/monitor.css", "text/css; charset=utf-8"),
    "/api/v1/schema": ("state.schema.json", "application/schema+json"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def read_package_file(name: str) -> bytes:
    return (_PACKAGE / name).read_bytes()


class MonitorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up shutdown

    def __init__(
        self,
        address: tuple[str, int],
        state: Callable[[], dict[str, Any] | None],
        metrics: Callable[[], bytes],
    ):
        self.state, self.metrics = state, metrics
        self.files = {path: (read_package_file(name), ctype) for path, (name, ctype) in STATIC_FILES.items()}
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: MonitorHTTPServer
    server_version = "swarm-monitor"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in self.server.files:
            body, ctype = self.server.files[path]
            self._send(HTTPStatus.OK, body, ctype)
        elif path == "/api/v1/state":
            state = self.server.state()
            if state is None:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b'{"error": "no look at the swarm yet"}', "application/json")
            else:
                self._send(HTTPStatus.OK, json.dumps(state, allow_nan=False).encode(), "application/json")
        elif path == "/metrics":
            self._send(HTTPStatus.OK, self.server.metrics(), CONTENT_TYPE_LATEST)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(f"{self.address_string()} {format % args}")
