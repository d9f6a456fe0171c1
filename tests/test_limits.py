"""Requests within peers' size limits: the batch-cutting rule and the judging of refusals (pure), the refusal's form
on the wire, limits in the DHT record, and a real swarm: a DP batch of 48 sequences with the peers' default limits
(max batch 32) trains exactly like local transformers, and what cannot be cut to fit fails with the limit named,
no peer banned."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from hivemind.p2p import PeerID

from dht.records import ServerRecord
from peers.wire import LimitExceeded, RemoteError, request_sizes
from peers.wire.validation import Limits, check_backward_size, check_forward_size, check_hidden
from privacy import DPSGD, DPConfig
from swarm import AutoDistributedModelForCausalLM
from swarm.limits import (
    TOKEN_LIMITS,
    RequestTooLargeError,
    batch_chunks,
    batch_refusal,
    judge_refusal,
    too_small_for_batch,
)
from swarm.routing import PeerSpan, SwarmSnapshot
from swarm.transport import PeerError, as_peer_error, call_info
from swarm.tuning import local_deep_prompts

PEER = PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes(range(32)))
VOCAB = 512
ATOL = 2e-5


def peer(**limits) -> PeerSpan:
    return PeerSpan(PEER, 0, 4, 100.0, 10_000, limits.pop("max_length", 2048), **limits)


def covers(chunks: list[slice], batch: int) -> bool:
    """Consecutive, non-empty, from row 0 to the last."""
    ends = [0] + [c.stop for c in chunks]
    return all(c.start == e and c.stop > c.start for c, e in zip(chunks, ends, strict=False)) and ends[-1] == batch


# ---- the rule: pure ----


def test_a_batch_over_max_batch_is_cut_evenly():
    chunks = batch_chunks(48, 8, peer(max_batch=32), "train", max_train_tokens=8192)
    assert chunks == [slice(0, 24), slice(24, 48)]
    assert batch_chunks(64, 8, peer(max_batch=32), "forward", 8192) == [slice(0, 32), slice(32, 64)]
    assert batch_chunks(7, 8, peer(max_batch=32), "forward", 8192) == [slice(0, 7)]


def test_each_kind_meets_its_token_limits():
    p = peer(max_batch=1000, max_forward_tokens=100, max_backward_tokens=40)
    assert [c.stop - c.start for c in batch_chunks(25, 10, p, "forward", 8192)] == [9, 8, 8]  # <= 10 rows
    for kind in ("train", "backward"):  # within max_backward_tokens too: 4 rows of 10 tokens
        assert [c.stop - c.start for c in batch_chunks(10, 10, p, kind, 8192)] == [4, 3, 3]
    assert [c.stop - c.start for c in batch_chunks(10, 10, p, "forward", 30)] == [3, 3, 2, 2]  # the client's own


def test_chunks_fit_every_limit_and_are_as_few_as_possible():
    rng = random.Random(0)
    for _ in range(500):
        batch, tokens = rng.randint(1, 200), rng.randint(1, 64)
        limits = {
            "max_batch": rng.choice([None, rng.randint(1, 64)]),
            "max_forward_tokens": rng.choice([None, rng.randint(64, 4096)]),
            "max_backward_tokens": rng.choice([None, rng.randint(64, 2048)]),
        }
        kind = rng.choice(list(TOKEN_LIMITS))
        max_train = rng.randint(1, 5000)
        chunks = batch_chunks(batch, tokens, peer(**limits), kind, max_train)
        assert covers(chunks, batch)
        token_limits = [limits[s] for s in TOKEN_LIMITS[kind] if limits[s] is not None]
        most = max(1, min([max_train, *token_limits]) // tokens)
        most = min(most, limits["max_batch"] or most)
        for c in chunks:
            rows = c.stop - c.start
            assert rows <= most
            sizes = request_sizes(rows, tokens)
            met = ("max_batch", *TOKEN_LIMITS[kind])  # the limits a request of this kind meets
            assert all(sizes[s] <= limits[s] for s in met if limits[s] is not None)
        assert len(chunks) == -(-batch // most)
        assert max(c.stop - c.start for c in chunks) - min(c.stop - c.start for c in chunks) <= 1


def test_unknown_limits_cut_by_max_train_tokens_only():
    assert batch_chunks(48, 8, None, "train", 100) == [slice(i, i + 12) for i in range(0, 48, 12)]
    assert batch_chunks(48, 8, peer(), "backward", 8192) == [slice(0, 48)]  # a record without limits
    assert batch_chunks(3, 500, None, "forward", 100) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # one row alone
    assert batch_chunks(0, 8, peer(max_batch=4), "forward", 100) == []


def test_a_sequence_over_a_token_limit_cannot_be_cut():
    p = peer(max_forward_tokens=512, max_backward_tokens=64, max_length=1000)
    with pytest.raises(RequestTooLargeError, match="max_forward_tokens=512") as caught:
        batch_chunks(2, 600, p, "forward", 8192)
    assert (caught.value.setting, caught.value.limit, caught.value.requested) == ("max_forward_tokens", 512, 600)
    assert "--max-forward-tokens" in str(caught.value) and str(PEER) in str(caught.value)
    assert batch_chunks(2, 100, p, "forward", 8192) == [slice(0, 2)]  # a forward does not meet the backward limit
    for kind in ("train", "backward"):
        with pytest.raises(RequestTooLargeError, match="max_backward_tokens=64"):
            batch_chunks(2, 100, p, kind, 8192)
    with pytest.raises(RequestTooLargeError, match="max_length=1000"):
        batch_chunks(1, 1001, dataclasses.replace(p, max_forward_tokens=None), "forward", 8192)


def refused(setting: str, limit: int, requested: int) -> PeerError:
    """A PeerError as the transport makes it from the peer's error frame."""
    return as_peer_error(PEER, RemoteError(str(LimitExceeded(setting, limit, requested, "detail"))))


def test_a_true_refusal_of_an_unannounced_limit_is_the_requests_error():
    judged = judge_refusal(refused("max_batch", 32, 48), 48, 8, peer())
    assert isinstance(judged, RequestTooLargeError) and not isinstance(judged, PeerError)
    assert (judged.setting, judged.limit, judged.requested, judged.peer_id) == ("max_batch", 32, 48, PEER)
    assert "max_batch=32" in str(judged)
    assert isinstance(judge_refusal(refused("max_backward_tokens", 100, 160), 20, 8, None), RequestTooLargeError)


@pytest.mark.parametrize(
    "error, batch, tokens, announced",
    [
        (refused("max_batch", 32, 48), 48, 8, peer(max_batch=64)),  # refuses what it announced it takes
        (refused("max_batch", 8, 16), 16, 8, peer(max_batch=32)),  # claims a lower limit than it announced
        (refused("max_batch", 8, 48), 16, 8, None),  # misstates the request's size
        (refused("max_batch", 16, 16), 16, 8, None),  # the request is within the limit it names
        (refused("max_forward_tokens", 64, 16), 16, 1, None),  # a limit the request is not over
        (refused("max_lora_rank", 4, 16), 16, 8, None),  # not a size limit of the request
        (PeerError(PEER, "timed out"), 48, 8, peer(max_batch=32)),  # not a refusal at all
        (as_peer_error(PEER, RemoteError("batch size 48 exceeds this peer's limit of 32")), 48, 8, None),  # no form
    ],
)
def test_other_refusals_are_failures_of_the_peer(error, batch, tokens, announced):
    assert judge_refusal(error, batch, tokens, announced) is error


# ---- the wire and the record ----


LIMITS = Limits(
    start=0, end=4, hidden_size=16, max_length=64, max_batch=4, max_forward_tokens=128, max_message_bytes=10**6,
    max_backward_tokens=32, max_lora_rank=8, max_prompt_length=8, max_held_tokens=1000, train_hold_timeout=1.0,
)  # fmt: skip


def test_limit_checks_raise_a_refusal_the_other_side_reads_back():
    cases = [
        (lambda: check_hidden(torch.zeros(5, 3, 16), LIMITS), ("max_batch", 4, 5)),
        (lambda: check_forward_size(torch.zeros(1, 65, 16), LIMITS), ("max_length", 64, 65)),
        (lambda: check_forward_size(torch.zeros(3, 50, 16), LIMITS), ("max_forward_tokens", 128, 150)),
        (lambda: check_backward_size(*[torch.zeros(2, 20, 16)] * 2, LIMITS), ("max_backward_tokens", 32, 40)),
    ]  # fmt: skip
    for check, expected in cases:
        with pytest.raises(LimitExceeded) as caught:
            check()
        assert (caught.value.setting, caught.value.limit, caught.value.requested) == expected
        read = RemoteError(str(caught.value)).refusal
        assert read is not None and (read.setting, read.limit, read.requested) == expected
    assert RemoteError("hidden size must be 16, got 17").refusal is None
    assert RemoteError("limit exceeded: max_batch=x, requested 5").refusal is None


def test_records_announce_limits_and_records_without_them_still_parse():
    base = dict(
        state="online", start=0, end=2, throughput=1.0, dtype="float32", quant="none", cache_tokens_left=10,
        max_length=64, version="0.1.0",
    )  # fmt: skip
    assert ServerRecord(**base).max_batch is None
    record = ServerRecord(**base, max_batch=32, max_forward_tokens=65536, max_backward_tokens=16384)
    assert ServerRecord.parse_obj(record.to_value()) == record
    with pytest.raises(ValueError):
        ServerRecord(**base, max_batch=0)


def test_sessions_route_around_peers_with_a_smaller_max_batch():
    """A session's batch cannot be cut: peers announcing less are left out, and only if they alone serve a block
    is the session refused, naming the largest batch that block is served with."""
    small, big, unknown = (PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes([i] * 32)) for i in (1, 2, 3))
    snapshot = SwarmSnapshot(
        8,
        {
            small: PeerSpan(small, 0, 8, 1.0, 100, 64, max_batch=4),
            big: PeerSpan(big, 0, 4, 1.0, 100, 64, max_batch=16),
            unknown: PeerSpan(unknown, 4, 6, 1.0, 100, 64),  # announces no limit: judged by its answer
        },
    )
    assert too_small_for_batch(snapshot, 4) == set()
    assert too_small_for_batch(snapshot, 8) == {small}
    assert too_small_for_batch(snapshot, 32) == {small, big}
    uncovered = snapshot.uncovered(0, 8, too_small_for_batch(snapshot, 8))
    assert uncovered == [6, 7]
    refusal = batch_refusal(snapshot, 8, uncovered, exclude=set())
    assert (refusal.peer_id, refusal.setting, refusal.limit, refusal.requested) == (small, "max_batch", 4, 8)
    assert "--max-batch" in str(refusal) and "block 6" in str(refusal)
    # the largest batch a block is served with is named; banned (excluded) peers are not
    refusal = batch_refusal(snapshot, 32, [0], exclude=set())
    assert (refusal.peer_id, refusal.limit) == (big, 16)
    assert batch_refusal(snapshot, 32, [0], exclude={small, big}) is None  # then: no peer at all, not the batch


# ---- a real swarm ----


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-example next-token losses, summed (a DP-SGD step backwards their sum)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum()


def errors_on_peers(model) -> int:
    sequence = model.model.sequence
    route = sequence.make_route(start=0, end=sequence.num_blocks, policy="hops")
    return sum(sequence.loop.run(call_info(sequence.p2p, s.peer_id, 10.0)).stats["errors"] for s in route)


@pytest.fixture(scope="module")
def client(llama_ckpt, llama_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=llama_swarm.initial_peers)
    yield model
    model.shutdown()


@pytest.mark.parametrize("hold", [True, False], ids=["held", "stateless"])
def test_a_dp_batch_of_48_trains_exactly_with_default_peer_limits(client, llama_ckpt, local_model, hold):
    """Default peer settings (max batch 32): the client cuts the batch of 48 to the announced limit; logits and
    per-example gradients equal local transformers', and no peer refused anything or was banned."""
    from swarm.tuning import ClientTuning

    sequence = client.model.sequence
    sequence.config.hold_activations = hold
    client.model.tuning = ClientTuning(client.config)
    client.tuning.add_deep_prompts(2)
    with torch.no_grad():
        client.tuning.named_trainables()["deep_prompts"].normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    params = client.tuning.named_trainables()
    ids = torch.randint(0, VOCAB, (48, 8), generator=torch.Generator().manual_seed(4))
    errors_before = errors_on_peers(client)
    assert {p.max_batch for p in sequence.view.snapshot().peers.values()} == {32}  # announced, default

    dpsgd = DPSGD(
        params, DPConfig(1000, sample_rate=0.048, max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0, seed=1)
    )
    replicas = dpsgd.per_example(ids.shape[0])
    with client.tuning.override(replicas.tensors):
        logits = client(ids).logits
        lm_loss(logits, ids).backward()
    swarm_grads = replicas.grads()["deep_prompts"]

    local = local_model(llama_ckpt)
    deep = replicas.tensors["deep_prompts"].detach().clone().requires_grad_(True)  # per example: [48, blocks, P, H]
    with local_deep_prompts(local, deep):
        local_logits = local(ids).logits
    lm_loss(local_logits, ids).backward()
    assert torch.allclose(logits, local_logits, atol=ATOL, rtol=1e-4)
    assert torch.allclose(swarm_grads, deep.grad, atol=ATOL, rtol=1e-4)
    assert not sequence.health.banned()
    assert errors_on_peers(client) == errors_before  # nothing was refused: every request fit


def test_a_peers_refusal_over_its_limit_is_the_requests_error(client):
    """A client that does not know the peers' limits (a record from before they were announced) sends the batch of
    48 whole: the peer refuses it over max_batch, and the client raises that, naming the limit, without banning
    the peer or trying another."""
    sequence = client.model.sequence
    known = sequence.view.peer

    def unannounced(peer_id):
        span = known(peer_id)
        return None if span is None else dataclasses.replace(span, max_batch=None)

    sequence.view.peer = unannounced
    try:
        hidden = torch.randn(48, 5, client.config.hidden_size)
        with pytest.raises(RequestTooLargeError, match="max_batch=32") as caught:
            sequence.forward(hidden)
    finally:
        del sequence.view.peer
    assert (caught.value.setting, caught.value.limit, caught.value.requested) == ("max_batch", 32, 48)
    assert isinstance(caught.value.__cause__, PeerError)
    assert not sequence.health.banned()
    assert sequence.health.failures_in_a_row(caught.value.peer_id) == 0
    assert sequence.forward(hidden[:32]).shape == (32, 5, client.config.hidden_size)  # the peer still serves


def test_a_sequence_over_the_peers_token_limit_fails_clearly_without_a_ban(llama_ckpt):
    from conftest import start_swarm

    swarm = start_swarm(llama_ckpt, peers=1, spans=[(0, 4)], extra_args=["--max-backward-tokens", "16"])
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=swarm.initial_peers)
    try:
        model.tuning.add_deep_prompts(2)
        sequence = model.model.sequence
        ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
        with pytest.raises(RequestTooLargeError, match="max_backward_tokens=16") as caught:
            lm_loss(model(ids).logits, ids).backward()
        assert caught.value.requested == 20 and "--max-backward-tokens" in str(caught.value)
        assert not sequence.health.banned() and not sequence.ledger.summary()  # refused before anything was sent
        with torch.no_grad():  # a forward alone meets only the forward limit: it fits
            assert model(ids).logits.shape == (2, 20, VOCAB)
        lm_loss(model(ids[:, :16]).logits, ids[:, :16]).backward()  # 16 tokens a row: backwards one row at a time
        assert not sequence.health.banned()
    finally:
        model.shutdown()
        swarm.stop_checked()


def test_an_inference_session_over_max_batch_is_refused_without_a_ban(client):
    """Sessions are not cut: one over every peer's announced max batch is refused before anything is sent; one
    sent to peers whose limit the client did not know is refused by them, and that is the session's error too."""
    sequence = client.model.sequence
    with pytest.raises(RequestTooLargeError, match="max_batch=32") as caught:
        client.inference_session(max_length=8, batch_size=40).__enter__()
    assert (caught.value.setting, caught.value.limit, caught.value.requested) == ("max_batch", 32, 40)
    assert not sequence.health.banned()

    known, snapshot = sequence.view.peer, sequence.view.snapshot

    def unannounced_snapshot(*args, **kwargs):
        taken = snapshot(*args, **kwargs)
        peers = {p: dataclasses.replace(s, max_batch=None) for p, s in taken.peers.items()}
        return dataclasses.replace(taken, peers=peers)

    def unannounced(peer_id):
        span = known(peer_id)
        return None if span is None else dataclasses.replace(span, max_batch=None)

    sequence.view.snapshot, sequence.view.peer = unannounced_snapshot, unannounced
    errors_before = errors_on_peers(client)
    try:
        with pytest.raises(RequestTooLargeError, match="max_batch=32") as caught:
            client.inference_session(max_length=8, batch_size=40).__enter__()
    finally:
        del sequence.view.snapshot, sequence.view.peer
    assert isinstance(caught.value.__cause__, PeerError)  # the peer did refuse it
    assert errors_on_peers(client) > errors_before
    assert not sequence.health.banned()
    assert sequence.health.failures_in_a_row(caught.value.peer_id) == 0
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    assert client.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 7)  # the peers still serve
