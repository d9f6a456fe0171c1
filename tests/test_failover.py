"""A peer killed mid-session (kill -9) is replaced by a replica; the results are exactly those of a run without it."""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import start_swarm, wait_until
from hivemind.p2p import PeerID
from transformers.generation.streamers import BaseStreamer

from swarm import AutoDistributedModelForCausalLM, NoRouteError, PeerError


def kill_serving(swarm, peer_id) -> None:
    [peer] = [p for p in swarm.peers if p.info["peer_id"] == peer_id.to_base58()]
    peer.process.kill()
    peer.process.wait(10)


def test_peer_killed_mid_generation_gives_identical_tokens(replicated, llama_ckpt, local_model):
    swarm, model = replicated

    class KillAt(BaseStreamer):
        """Kills the peer serving blocks 2-3 once `at` tokens are out; records the session's failovers."""

        def __init__(self, at: int):
            self.count, self.at, self.session = 0, at, None

        def put(self, value):
            self.count += 1
            if self.count == self.at:
                self.session = model.active_session
                kill_serving(swarm, self.session.route[-1].peer_id)

        def end(self):
            pass

    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(30))
    expected = local_model(llama_ckpt).generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    streamer = KillAt(at=16)
    out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, streamer=streamer)
    assert streamer.session is not None and streamer.session.failovers == 1
    assert torch.equal(out, expected)


def test_whole_sequence_forward_survives_a_dead_peer(replicated, llama_ckpt, local_model):
    swarm, model = replicated
    sequence = model.model.sequence
    route = sequence.make_route()
    victim = route[-1].peer_id
    kill_serving(swarm, victim)  # the DHT still lists it as online: the client must notice and move on

    class PreferVictim(random.Random):
        """Forward routes pick replicas at random by throughput; make sure the dead one is tried first."""

        def choices(self, population, weights=None, **kwargs):
            return [p for p in population if p.peer_id == victim][:1] or super().choices(population, weights, **kwargs)

    sequence.planner.rng = PreferVictim(0)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        remote, local = model(ids).logits, local_model(llama_ckpt)(ids).logits
    assert torch.allclose(remote, local, atol=1e-4, rtol=0)
    assert victim in sequence.health.banned()


def test_losing_the_only_holder_fails_clearly_and_quickly(replicated):
    swarm, model = replicated
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(32))
    with model.inference_session(max_length=32) as session:
        model.generate(ids, max_new_tokens=2)
        kill_serving(swarm, session.route[0].peer_id)  # blocks 0-1 have no replica
        began = time.monotonic()
        with pytest.raises(NoRouteError, match=r"block\(s\) 0-1"):
            model.generate(None, max_new_tokens=2)
        assert time.monotonic() - began < 20


def test_restarted_peer_with_same_identity_is_used_again_after_its_ban(tmp_path, llama_ckpt, local_model):
    swarm = start_swarm(llama_ckpt, peers=1, spans=[(0, 4)])  # a bootstrap peer that stays up
    key = str(tmp_path / "peer-a.key")
    model = None
    try:
        first = swarm.start_peer((0, 4), extra_args=["--log-level", "WARNING", "--identity-path", key], name="a")
        peer_a = first.info["peer_id"]
        model = AutoDistributedModelForCausalLM.from_pretrained(
            llama_ckpt,
            initial_peers=swarm.initial_peers,
            allowed_peers=[peer_a],  # force every route through peer A
            ban_seconds=1.0,
            max_ban_seconds=1.0,
            failover_timeout=2.0,
        )
        ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(33))
        with torch.no_grad():
            expected = local_model(llama_ckpt)(ids).logits
            assert torch.allclose(model(ids).logits, expected, atol=1e-4, rtol=0)
            first.process.kill()
            first.process.wait(10)
            with pytest.raises((PeerError, NoRouteError)):
                model(ids)
            sequence = model.model.sequence
            assert sequence.health.failures_in_a_row(PeerID.from_base58(peer_a)) >= 1

            again = swarm.start_peer((0, 4), extra_args=["--log-level", "WARNING", "--identity-path", key], name="a2")
            assert again.info["peer_id"] == peer_a  # same identity, same peer ID
            banned = sequence.health.banned
            wait_until(lambda: PeerID.from_base58(peer_a) not in banned(), "the ban (at most 1 s) runs out")
            model.model.sequence.view.snapshot(refresh=True)
            assert torch.allclose(model(ids).logits, expected, atol=1e-4, rtol=0)
            assert [s.peer_id.to_base58() for s in sequence.make_route()] == [peer_a]
            assert sequence.health.failures_in_a_row(PeerID.from_base58(peer_a)) == 0  # the backoff starts over
    finally:
        if model is not None:
            model.shutdown()
        swarm.stop()


def test_background_refresh_finds_new_peers_and_measures_their_rtt(replicated, llama_ckpt):
    swarm, _ = replicated
    # Earlier tests killed peers, maybe the first one: join through one that is alive.
    swarm.bootstrap = next(p for p in swarm.peers if p.process.poll() is None).info["maddrs"]
    # A view that never expires by itself: only the background refresh can bring in the new peer.
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=swarm.initial_peers, snapshot_ttl=1e6, refresh_period=0.3
    )
    try:
        sequence = model.model.sequence
        before = set(sequence.view.snapshot().peers)
        newcomer = swarm.start_peer((2, 4), extra_args=["--log-level", "WARNING"], name="newcomer")
        new_id = PeerID.from_base58(newcomer.info["peer_id"])
        assert new_id not in before
        deadline = time.monotonic() + 20
        view, health = sequence.view, sequence.health
        while time.monotonic() < deadline and not (new_id in view.snapshot().peers and new_id in health.rtt()):
            time.sleep(0.1)
        assert new_id in sequence.view.snapshot().peers, "the background refresh did not pick up the new peer"
        # Every live peer was probed without any generation: latency routing has measurements from the start.
        live = {PeerID.from_base58(p.info["peer_id"]) for p in swarm.peers if p.process.poll() is None}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not live <= set(sequence.health.rtt()):
            time.sleep(0.1)
        assert live <= set(sequence.health.rtt()), "some peers were never probed"
        assert all(0 < rtt < 1.0 for rtt in sequence.health.rtt().values())
    finally:
        model.shutdown()
