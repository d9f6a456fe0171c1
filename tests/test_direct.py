"""Direct connections (peers.direct, swarm.direct): an inference session moved off the libp2p stream onto a TLS
connection whose certificate hash and ticket came through the authenticated stream. The rules of the offer and of
the addresses offline; then real peers: tokens identical to transformers over direct connections, the listener
refusing a wrong ticket, a used ticket and a client pinning another certificate, errors still reaching the client,
and a session that cannot attach staying on its stream."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import start_swarm
from hivemind.proto import runtime_pb2
from test_push import peer_stats

import swarm.transport
from blocks.adapters import Adapters
from peers.direct import direct_hosts, ip_of
from peers.wire import (
    INFERENCE_HANDLER,
    DirectOffer,
    OpenSession,
    ProtocolError,
    SessionOpened,
    receive_message,
    send_message,
)
from swarm import AutoDistributedModelForCausalLM
from swarm.direct import DirectConnectError, connect_direct
from swarm.transport import InferenceStream, PeerError, open_stream

CERT, TICKET = "ab" * 32, "cd" * 32


def test_offer_fields_are_checked():
    offer = DirectOffer(("127.0.0.1", "::1"), 4242, CERT, TICKET)
    assert DirectOffer.from_meta(offer.to_meta()) == offer
    bad = {
        "hosts": ([], "1 to 8 hosts"),
        "port": (0, "port"),
        "cert": ("AB" * 32, "cert_sha256"),
        "ticket": ("cd" * 16, "ticket"),
    }
    for field, (value, match) in bad.items():
        meta = offer.to_meta()
        meta[["hosts", "port", "cert", "ticket"].index(field)] = value
        with pytest.raises(ProtocolError, match=match):
            DirectOffer.from_meta(meta)
    for host in ("example.com", "127.0.0.1:80", 5, "1.2.3.4" * 20):
        with pytest.raises(ProtocolError, match="host"):
            DirectOffer.from_meta([[host], 4242, CERT, TICKET])
    with pytest.raises(ProtocolError, match="1 to 8 hosts"):
        DirectOffer.from_meta([["127.0.0.1"] * 9, 4242, CERT, TICKET])
    with pytest.raises(ProtocolError, match="direct"):
        DirectOffer.from_meta({"hosts": []})


def test_addresses_offered():
    assert ip_of("/ip4/10.0.0.1/tcp/5") == "10.0.0.1" and ip_of("/ip6/::1/tcp/5") == "::1"
    assert ip_of("/dns4/example.com/tcp/5") is None
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    assert direct_hosts(None, [], loopback, [], []) == ("127.0.0.1", ("127.0.0.1",))
    assert direct_hosts("10.0.0.2", ["1.2.3.4"], loopback, [], []) == ("10.0.0.2", ("1.2.3.4",))
    wildcard = ["/ip4/0.0.0.0/tcp/0"]
    announced = ["/ip4/5.6.7.8/tcp/31337", "/dns4/x.org/tcp/1"]
    assert direct_hosts(None, [], wildcard, announced, []) == ("0.0.0.0", ("5.6.7.8",))
    visible = ["/ip4/192.168.1.5/tcp/4/p2p/Qm", "/ip4/0.0.0.0/tcp/4", "/ip4/192.168.1.5/udp/4/quic"]
    assert direct_hosts(None, [], wildcard, [], visible) == ("0.0.0.0", ("192.168.1.5",))
    assert direct_hosts(None, [], wildcard, [], []) == ("0.0.0.0", ())


@pytest.fixture(scope="module")
def direct_swarm(llama_ckpt):
    swarm = start_swarm(llama_ckpt, extra_args=["--direct"])
    yield swarm
    swarm.stop_checked()


@pytest.fixture(scope="module")
def client(llama_ckpt, direct_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=direct_swarm.initial_peers, direct=True
    )
    yield model
    model.shutdown()


def first_peer(model):
    sequence = model.model.sequence
    return sequence.make_route(start=0, end=sequence.remote_end)[0]


async def open_raw(sequence, span) -> tuple[SessionOpened, object]:
    """An inference session opened by hand, asking for a direct offer: (the peer's answer, the stream's writer)."""
    _, reader, writer = await open_stream(sequence.p2p, span.peer_id, INFERENCE_HANDLER, 10.0)
    await send_message(OpenSession(span.start, span.end, 16, 1, Adapters(), direct=True).encode(), writer)
    response = await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=2**20)
    return SessionOpened.decode(response), writer


@pytest.mark.parametrize("push", [True, False], ids=["push", "client-relayed"])
def test_generation_over_direct_connections_matches_transformers(push, client, llama_ckpt, local_model):
    """Steps and replies over direct connections, the output pushed between the peers through libp2p or relayed by
    the client: the same tokens as transformers, each step computed once by each peer."""
    client.model.sequence.config.push = push
    try:
        ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(3))
        expected = local_model(llama_ckpt).generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        before = peer_stats(client)
        with client.inference_session(max_length=32, batch_size=2) as session:
            out = client.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
            assert len(session._streams) == 2 and all(stream.direct for stream in session._streams)
            route = [s.peer_id.to_base58() for s in session.route]
        assert torch.equal(out, expected)
        after = peer_stats(client)
        first, second = ({k: after[p][k] - before[p][k] for k in ("inference_steps", "pushes")} for p in route)
        assert first["inference_steps"] == second["inference_steps"] == 10
        assert first["pushes"] == (10 if push else 0) and second["pushes"] == 0
    finally:
        client.model.sequence.config.push = True


def test_clients_and_peers_without_direct_use_the_stream(llama_ckpt, llama_swarm, direct_swarm):
    """Direct connections take both sides: a peer without --direct offers none; a client without direct asks none."""
    for peers, wants in ((llama_swarm, True), (direct_swarm, False)):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            llama_ckpt, initial_peers=peers.initial_peers, direct=wants
        )
        try:
            with model.inference_session(max_length=8) as session:
                assert not any(stream.direct for stream in session._streams)
                model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
        finally:
            model.shutdown()


def test_listener_admits_only_the_offered_ticket_and_certificate(client):
    sequence = client.model.sequence
    span = first_peer(client)
    opened, writer = sequence.loop.run(open_raw(sequence, span))
    offer = opened.direct
    assert offer is not None and offer.hosts == ("127.0.0.1",)

    def connect(o: DirectOffer):
        return sequence.loop.run(connect_direct(sequence.p2p, span.peer_id, o, opened.session_id, 10.0))

    with pytest.raises(DirectConnectError, match="ticket refused|closed"):
        connect(dataclasses.replace(offer, ticket="0" * 64))
    with pytest.raises(DirectConnectError, match="certificate is not the one"):
        connect(dataclasses.replace(offer, cert_sha256="0" * 64))
    with pytest.raises(DirectConnectError, match="known address"):  # never dialled
        connect(dataclasses.replace(offer, hosts=("10.255.255.1",)))
    reader, direct_writer = connect(offer)  # the real ticket still works: refusals did not burn it
    with pytest.raises(DirectConnectError, match="ticket refused|closed"):
        connect(offer)  # once only
    direct_writer.close()
    writer.close()


def test_errors_of_a_direct_session_reach_the_client(client):
    """A bad step sent over the direct connection is refused; the refusal comes on the stream and names it."""
    sequence = client.model.sequence
    span = first_peer(client)
    stream = InferenceStream(sequence.p2p, span.peer_id, span.start, span.end, 2**24, 10.0, direct=True)
    sequence.loop.run(stream.open(16, 1, 10.0, Adapters()))
    assert stream.direct
    hidden = torch.randn(1, 2, sequence.hidden_size + 1)  # wrong hidden size
    with pytest.raises(PeerError, match="hidden"):
        sequence.loop.run(stream.step(hidden, 0))
    sequence.loop.run(stream.close())


def test_a_session_that_cannot_attach_stays_on_its_stream(client, llama_ckpt, local_model, monkeypatch):
    async def refuse(*args, **kwargs):
        raise DirectConnectError("refused for the test")

    monkeypatch.setattr(swarm.transport, "connect_direct", refuse)
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(4))
    expected = local_model(llama_ckpt).generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with client.inference_session(max_length=32) as session:
        out = client.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert not any(stream.direct for stream in session._streams)
    assert torch.equal(out, expected)


def test_a_peer_killed_mid_session_fails_over_with_direct_connections(llama_ckpt, local_model):
    """kill -9 of the peer serving blocks 2-3 over a direct connection: the replica takes over (its session replayed,
    over its own direct connection) and the tokens are those of transformers."""
    from test_failover import kill_serving

    swarm_ = start_swarm(llama_ckpt, peers=3, spans=[(0, 2), (2, 4), (2, 4)], extra_args=["--direct"])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=swarm_.initial_peers, direct=True, check_rate=0.0
    )
    try:
        ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(31))
        expected = local_model(llama_ckpt).generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        with model.inference_session(max_length=64) as session:
            first = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            victim = session.route[-1].peer_id
            kill_serving(swarm_, victim)
            out = model.generate(None, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert session.failovers == 1 and session.route[-1].peer_id != victim
            assert all(stream.direct for stream in session._streams)
        assert torch.equal(first, expected[:, :22]) and torch.equal(out, expected)
    finally:
        model.shutdown()
        swarm_.stop()  # one peer was killed on purpose: exit codes are not checked
