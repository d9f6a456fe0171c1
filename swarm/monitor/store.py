"""The monitor's history in SQLite: every look at the swarm is one row per model and one per peer, kept for the
retention period, so that a restarted monitor still shows the past hours (and the models whose peers are all gone).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from swarm.monitor.state import ModelInfo, ModelSample, ModelView, PeerSample, is_healthy

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    prefix TEXT PRIMARY KEY, num_blocks INTEGER, family TEXT, name TEXT, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_samples (
    t REAL NOT NULL, prefix TEXT NOT NULL, covered INTEGER NOT NULL, num_blocks INTEGER, healthy INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS model_samples_by_time ON model_samples (prefix, t);
CREATE TABLE IF NOT EXISTS peer_samples (
    t REAL NOT NULL, prefix TEXT NOT NULL, peer_id TEXT NOT NULL, state TEXT NOT NULL, public_name TEXT
);
CREATE INDEX IF NOT EXISTS peer_samples_by_time ON peer_samples (prefix, t);
"""


class HistoryStore:
    """Thread-safe (one lock): the collector writes while the web server's threads may read."""

    def __init__(self, path: str, retention_s: float):
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")  # a crash mid-write loses at most that write
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def known_models(self, since: float) -> dict[str, ModelInfo]:
        """Models seen since `since` with the size last announced for them."""
        rows = self._rows("SELECT prefix, num_blocks, family, name FROM models WHERE last_seen >= ?", since)
        return {prefix: ModelInfo(prefix, num_blocks, family, name) for prefix, num_blocks, family, name in rows}

    def record(self, t: float, models: list[ModelView]) -> None:
        """One look at the swarm: a sample per model and per listed peer, then drop what is past the retention."""
        with self._lock, self._db:
            for model in models:
                info = model.info
                if info.num_blocks is not None and info.registered_by > 0:
                    self._db.execute(
                        "INSERT INTO models VALUES (?, ?, ?, ?, ?) ON CONFLICT(prefix) DO UPDATE SET "
                        "num_blocks = excluded.num_blocks, family = excluded.family, name = excluded.name, "
                        "last_seen = excluded.last_seen",
                        (info.prefix, info.num_blocks, info.family, info.name, t),
                    )
                covered = sum(1 for c in model.coverage if c > 0)
                healthy = is_healthy(model.coverage)
                self._db.execute(
                    "INSERT INTO model_samples VALUES (?, ?, ?, ?, ?)",
                    (t, info.prefix, covered, info.num_blocks, int(healthy)),
                )
                self._db.executemany(
                    "INSERT INTO peer_samples VALUES (?, ?, ?, ?, ?)",
                    [(t, info.prefix, p.peer_id, p.state, p.record.public_name) for p in model.peers],
                )
            cutoff = t - self.retention_s
            for table in ("model_samples", "peer_samples"):
                self._db.execute(f"DELETE FROM {table} WHERE t < ?", (cutoff,))
            self._db.execute("DELETE FROM models WHERE last_seen < ?", (cutoff,))

    def _rows(self, sql: str, *params: object) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def model_samples(self, prefix: str, since: float) -> list[ModelSample]:
        rows = self._rows(
            "SELECT t, covered, num_blocks, healthy FROM model_samples WHERE prefix = ? AND t >= ? ORDER BY t",
            prefix,
            since,
        )
        return [ModelSample(t, covered, num_blocks, bool(healthy)) for t, covered, num_blocks, healthy in rows]

    def peer_samples(self, prefix: str, since: float) -> list[PeerSample]:
        rows = self._rows(
            "SELECT t, peer_id, state, public_name FROM peer_samples WHERE prefix = ? AND t >= ? ORDER BY t",
            prefix,
            since,
        )
        return [PeerSample(t, peer_id, state, name) for t, peer_id, state, name in rows]
