"""Requests within the size limits peers announce: pure rules, no network.

A whole-sequence request to a peer (a forward, a training forward whose graph the peer may hold until the backward,
or a stateless backward) is cut by rows into chunks that each fit the peer's announced limits: rows within
``max_batch``, rows x tokens within its token limits for that kind of request and within the client's own
``max_train_tokens``. What cannot be cut to fit (one sequence alone over a limit) is refused before anything is
sent, with RequestTooLargeError: an error of the request, so no peer is banned and nothing is re-routed.

A peer's refusal of a request over one of its limits (peers.wire.LimitExceeded on the wire) is judged by
`judge_refusal`: it is the request's error only if the request really is over the limit the peer names and over
what the peer announced for it; a peer refusing what it announced it takes has failed like any other.

An inference session cannot be cut (its batch shares one KV cache per peer), so routes for it skip the peers that
announce a max batch below the session's (`too_small_for_batch`); if only such peers serve some block, opening the
session is refused with RequestTooLargeError naming the largest batch those blocks are served with.
"""

from __future__ import annotations

import math
from typing import Literal

from hivemind.p2p import PeerID

from peers.wire import request_sizes
from swarm.routing import PeerSpan, SwarmSnapshot
from swarm.transport import PeerError

RequestKind = Literal["forward", "train", "backward"]
# The peer's limits on rows x tokens that each kind of request meets: a training forward is held for its backward
# only within max_backward_tokens, and a backward recomputes the forward.
TOKEN_LIMITS: dict[RequestKind, tuple[str, ...]] = {
    "forward": ("max_forward_tokens",),
    "train": ("max_forward_tokens", "max_backward_tokens"),
    "backward": ("max_forward_tokens", "max_backward_tokens"),
}


class RequestTooLargeError(ValueError):
    """A request over one of a peer's size limits that cannot be cut to fit it: an error of the request (make the
    sequences shorter), not of the peer, which is neither banned nor replaced."""

    def __init__(self, peer_id: PeerID, setting: str, limit: int, requested: int, what: str):
        self.peer_id, self.setting, self.limit, self.requested = peer_id, setting, limit, requested
        flag = setting.replace("_", "-")
        super().__init__(f"{what}: {requested} is over {setting}={limit} of peer {peer_id} (its --{flag} setting)")


def announced(peer: PeerSpan | None, setting: str) -> int | None:
    """The value `peer` announced for a size limit; None if unknown (no record, or one from before limits were
    announced)."""
    return None if peer is None else getattr(peer, setting, None)


def batch_chunks(
    batch: int, tokens: int, peer: PeerSpan | None, kind: RequestKind, max_train_tokens: int
) -> list[slice]:
    """Consecutive row slices of a [batch, tokens] request of `kind` to `peer`, as few as its announced limits and
    `max_train_tokens` allow and as even as possible. RequestTooLargeError if one sequence alone is over a limit
    the peer announced (the client's own max_train_tokens only bounds chunks: a sequence over it goes alone)."""
    one = request_sizes(1, tokens)
    token_limits = [max_train_tokens]
    for setting in ("max_length", *TOKEN_LIMITS[kind]):
        limit = announced(peer, setting)
        if limit is None:
            continue
        if one[setting] > limit:
            raise RequestTooLargeError(
                peer.peer_id, setting, limit, one[setting], f"a sequence of {tokens} tokens cannot be cut to fit"
            )
        if setting != "max_length":
            token_limits.append(limit)
    rows = max(1, min(token_limits) // max(tokens, 1))
    max_batch = announced(peer, "max_batch")
    if max_batch is not None:
        rows = min(rows, max_batch)
    if batch <= 0:
        return []
    chunks = math.ceil(batch / rows)
    base, extra = divmod(batch, chunks)
    slices, first = [], 0
    for i in range(chunks):
        size = base + (1 if i < extra else 0)
        slices.append(slice(first, first + size))
        first += size
    return slices


def judge_refusal(error: PeerError, batch: int, tokens: int, peer: PeerSpan | None) -> Exception:
    """What a peer's failure of a [batch, tokens] request means: RequestTooLargeError if the peer refused it over
    a size limit that the request really is over (the size it names is the request's, above the limit it names)
    and that the peer did not announce higher; otherwise `error` itself, a failure of the peer (which also covers
    a peer that refuses what it announced it takes, or misstates the request to be spared a ban)."""
    refusal = error.refusal
    if refusal is None:
        return error
    actual = request_sizes(batch, tokens).get(refusal.setting)
    if actual is None or actual != refusal.requested or actual <= refusal.limit:
        return error
    limit = announced(peer, refusal.setting)
    if limit is not None and actual <= limit:
        return error
    what = f"a request of {batch}x{tokens} tokens was refused"
    return RequestTooLargeError(error.peer_id, refusal.setting, refusal.limit, actual, what)


def too_small_for_batch(snapshot: SwarmSnapshot, batch: int) -> set[PeerID]:
    """Peers that announce a max batch below `batch` (peers that announce none are given the benefit of the
    doubt: their refusal is judged like any other)."""
    return {p.peer_id for p in snapshot.peers.values() if p.max_batch is not None and p.max_batch < batch}


def batch_refusal(
    snapshot: SwarmSnapshot, batch: int, blocks: list[int], exclude: set[PeerID]
) -> RequestTooLargeError | None:
    """Why `blocks` have no route for a session of `batch` rows, if the peers left out for their max batch alone
    would have served them: RequestTooLargeError naming the peer that serves the first such block with the
    largest batch. None if the batch is not the reason."""
    small = too_small_for_batch(snapshot, batch)
    for block in blocks:
        servers = [
            p for p in snapshot.peers.values()
            if p.peer_id in small and p.peer_id not in exclude and p.start <= block < p.end
        ]  # fmt: skip
        if servers:
            best = max(servers, key=lambda p: p.max_batch or 0)
            what = f"an inference session of batch {batch} (block {block} is served only with smaller batches)"
            return RequestTooLargeError(best.peer_id, "max_batch", int(best.max_batch or 0), batch, what)
    return None
