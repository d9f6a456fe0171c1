"""Who saw what: a per-session ledger of the activations each peer computed on, and the local/remote block split.

Blocks are counted as spans [start_block, end_block) like everywhere else in blockswarm; the printed table shows
them inclusively ("0-3" is blocks 0, 1, 2 and 3).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from privacy.errors import check_int

ExposureKind = Literal["forward", "backward", "inference"]
EXPOSURE_KINDS: tuple[ExposureKind, ...] = ("forward", "backward", "inference")
_KIND_INDEX = {kind: i for i, kind in enumerate(EXPOSURE_KINDS)}


@dataclass(frozen=True)
class ExposureRow:
    """Everything one peer saw for one span of blocks: tokens per kind of request, and how many requests.

    forward: hidden states of training tokens; backward: those hidden states again plus the gradients flowing
    back into them; inference: hidden states of generation inputs (prompt and generated tokens).
    """

    peer_id: str
    start_block: int
    end_block: int
    forward_tokens: int = 0
    backward_tokens: int = 0
    inference_tokens: int = 0
    requests: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ValueError(f"peer_id must be a non-empty string, got {self.peer_id!r}")
        check_int("start_block", self.start_block, 0)
        check_int("end_block", self.end_block, self.start_block + 1)
        for kind in EXPOSURE_KINDS:
            check_int(f"{kind}_tokens", getattr(self, f"{kind}_tokens"), 0)
        check_int("requests", self.requests, 0)

    @property
    def blocks(self) -> range:
        return range(self.start_block, self.end_block)

    def tokens(self, kind: ExposureKind) -> int:
        return int(getattr(self, f"{_checked_kind(kind)}_tokens"))


def _checked_kind(kind: object) -> str:
    if kind not in EXPOSURE_KINDS:
        raise ValueError(f"kind must be one of {EXPOSURE_KINDS}, got {kind!r}")
    return str(kind)


class ExposureLedger:
    """Thread-safe running totals of which peer saw which blocks' activations, for how many tokens of each kind."""

    def __init__(self, session_id: str | None = None, rows: Iterable[ExposureRow] = ()) -> None:
        self.session_id = session_id
        self._lock = threading.Lock()
        # (peer, start, end) -> [forward, backward, inference tokens, requests]: counted in place, rows built on read
        self._counts: dict[tuple[str, int, int], list[int]] = {}
        for row in rows:
            key = (row.peer_id, row.start_block, row.end_block)
            if key in self._counts:
                raise ValueError(
                    f"duplicate ledger row for peer {row.peer_id} blocks [{row.start_block}, {row.end_block})"
                )
            self._counts[key] = [*(row.tokens(kind) for kind in EXPOSURE_KINDS), row.requests]

    def record(self, peer_id: str, start_block: int, end_block: int, tokens: int, kind: ExposureKind) -> None:
        """Count one request: `peer_id` computed blocks [start_block, end_block) on `tokens` tokens' activations.

        O(1) and allocation-free for a (peer, span) seen before: it runs on every generation step."""
        index = _KIND_INDEX.get(kind)
        if index is None:
            _checked_kind(kind)
        if type(tokens) is not int or tokens < 0:
            check_int("tokens", tokens, 0)
        key = (peer_id, start_block, end_block)
        counts = self._counts.get(key)
        if counts is None:
            ExposureRow(peer_id, start_block, end_block)  # validates the peer and span before the first count
            with self._lock:
                counts = self._counts.setdefault(key, [0, 0, 0, 0])
        with self._lock:
            counts[index] += tokens
            counts[3] += 1

    def summary(self) -> list[ExposureRow]:
        """All rows, by peer and then by span."""
        with self._lock:
            items = [(key, list(self._counts[key])) for key in sorted(self._counts)]
        return [
            ExposureRow(*key, forward_tokens=c[0], backward_tokens=c[1], inference_tokens=c[2], requests=c[3])
            for key, c in items
        ]

    def peers(self) -> list[str]:
        return sorted({row.peer_id for row in self.summary()})

    def blocks_seen_by(self, peer_id: str) -> list[int]:
        """Every block index whose input activations `peer_id` saw, in any kind of request."""
        return sorted({block for row in self.summary() if row.peer_id == peer_id for block in row.blocks})

    def to_json(self) -> str:
        return json.dumps({"session_id": self.session_id, "rows": [asdict(row) for row in self.summary()]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ExposureLedger:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError("an exposure ledger is a JSON object with a 'rows' list")
        session_id = data.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            raise ValueError(f"session_id must be a string or null, got {session_id!r}")
        try:
            rows = [ExposureRow(**row) for row in data["rows"]]
        except TypeError as e:  # a row with missing or unknown fields
            raise ValueError(f"bad exposure ledger row: {e}") from e
        return cls(session_id=session_id, rows=rows)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ExposureLedger:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def format_table(self) -> str:
        """A plain-text table for printing, one line per (peer, span) and a total line."""
        rows = self.summary()
        header = ["peer", "blocks", *(f"{kind} tokens" for kind in EXPOSURE_KINDS), "requests"]
        body = [
            [row.peer_id, f"{row.start_block}-{row.end_block - 1}", *(str(row.tokens(k)) for k in EXPOSURE_KINDS)]
            + [str(row.requests)]
            for row in rows
        ]
        body.append(
            ["total", "", *(str(sum(row.tokens(k) for row in rows)) for k in EXPOSURE_KINDS)]
            + [str(sum(row.requests for row in rows))]
        )
        widths = [max(len(cells[i]) for cells in (header, *body)) for i in range(len(header))]
        # Names left-aligned, numbers right-aligned.
        lines = [
            "  ".join(
                cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
            )
            for cells in (header, *body)
        ]
        title = "exposure ledger" + (f" of session {self.session_id}" if self.session_id else "")
        return "\n".join([title, *lines])


def split_local_blocks(
    num_blocks: int, local_first_k: int, local_last_k: int, *, allow_all_local: bool = False
) -> tuple[range, range, range]:
    """(blocks run locally before the swarm, blocks the swarm runs, blocks run locally after it).

    Keeping the first k blocks local means peers never see the embeddings of the raw tokens, only hidden states
    after k blocks; keeping the last k local means they never see the states that feed the LM head. An empty
    remote part (first + last == num_blocks) runs the whole model locally: it is refused unless
    `allow_all_local`, because with a swarm client it almost always means a mistyped k.
    """
    num_blocks = check_int("num_blocks", num_blocks, 1)
    local_first_k = check_int("local_first_k", local_first_k, 0)
    local_last_k = check_int("local_last_k", local_last_k, 0)
    if local_first_k + local_last_k > num_blocks:
        raise ValueError(f"{local_first_k} + {local_last_k} local blocks exceed the model's {num_blocks} blocks")
    if local_first_k + local_last_k == num_blocks and not allow_all_local:
        raise ValueError(f"all {num_blocks} blocks would run locally; pass allow_all_local=True if that is intended")
    remote_end = num_blocks - local_last_k
    return range(0, local_first_k), range(local_first_k, remote_end), range(remote_end, num_blocks)
