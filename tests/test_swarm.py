"""End-to-end: real `swarm-peer` processes on 127.0.0.1, a client session, exact agreement with transformers."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import start_swarm, wait_until
from hivemind.utils import get_dht_time
from transformers.generation.streamers import BaseStreamer

from dht.announce import fetch_block_servers
from swarm import AutoDistributedModelForCausalLM, NoRouteError


def prompt(batch: int = 1, length: int = 12, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_ready_files_describe_the_peers(llama_swarm):
    for peer, span in zip(llama_swarm.peers, llama_swarm.spans, strict=True):
        info = json.loads(peer.ready_file.read_text())
        assert set(info) == {"peer_id", "maddrs", "blocks"}
        assert info["blocks"] == list(span)
        assert info["maddrs"] and all(m.startswith("/ip4/127.0.0.1/tcp/") for m in info["maddrs"])
        assert all(m.endswith("/p2p/" + info["peer_id"]) for m in info["maddrs"])


def test_whole_sequence_logits_match_local_llama(llama_ckpt, llama_client, local_model):
    ids = prompt(batch=2, length=17)
    with torch.no_grad():
        remote = llama_client(ids).logits
        local = local_model(llama_ckpt)(ids).logits
    assert remote.shape == local.shape
    assert torch.allclose(remote, local, atol=1e-4, rtol=0), (remote - local).abs().max()


def test_qwen2_logits_and_greedy_match_local(qwen2_ckpt, local_model):
    swarm = start_swarm(qwen2_ckpt)
    model = None
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(qwen2_ckpt, initial_peers=swarm.initial_peers)
        assert type(model).__name__ == "DistributedQwen2ForCausalLM"
        ids = prompt(batch=2, length=15, seed=3)
        with torch.no_grad():
            remote, local = model(ids).logits, local_model(qwen2_ckpt)(ids).logits
        assert torch.allclose(remote, local, atol=1e-4, rtol=0), (remote - local).abs().max()
        ids = prompt(seed=4)
        out_remote = model.generate(ids, max_new_tokens=32, do_sample=False)
        out_local = local_model(qwen2_ckpt).generate(ids, max_new_tokens=32, do_sample=False)
        assert torch.equal(out_remote, out_local)
    finally:
        if model is not None:
            model.shutdown()
        swarm.stop_checked()


def test_greedy_generation_is_identical(llama_ckpt, llama_client, local_model):
    ids = prompt(seed=5)
    out_remote = llama_client.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    out_local = local_model(llama_ckpt).generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert out_remote.shape == (1, 52)
    assert torch.equal(out_remote, out_local)


def test_sampling_with_same_seed_is_identical(llama_ckpt, llama_client, local_model):
    ids = prompt(batch=2, seed=6)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=True, temperature=1.3, top_k=50, top_p=0.95)
    torch.manual_seed(123)
    out_remote = llama_client.generate(ids, **kwargs)
    torch.manual_seed(123)
    out_local = local_model(llama_ckpt).generate(ids, **kwargs)
    assert torch.equal(out_remote, out_local)
    torch.manual_seed(124)
    assert not torch.equal(llama_client.generate(ids, **kwargs), out_remote), "sampling ignored the seed"


def test_generate_calls_in_one_session_continue(llama_ckpt, llama_client, local_model):
    ids = prompt(seed=7)
    reference = local_model(llama_ckpt).generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with llama_client.inference_session(max_length=64) as session:
        first = llama_client.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        second = llama_client.generate(None, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert session.position == 12 + 20 - 1  # the last sampled token is never fed back
    assert torch.equal(first, reference[:, :20])
    assert torch.equal(second, reference)


def test_session_appends_new_inputs(llama_ckpt, llama_client, local_model):
    ids, extra = prompt(seed=8), prompt(length=5, seed=9)
    with llama_client.inference_session(max_length=64):
        first = llama_client.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        second = llama_client.generate(extra, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = local_model(llama_ckpt).generate(
        torch.cat([first, extra], dim=1), max_new_tokens=6, min_new_tokens=6, do_sample=False
    )
    assert torch.equal(second, expected)


def test_streamer_receives_every_token(llama_client):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).clone())

        def end(self):
            self.ended = True

    streamer = Collect()
    ids = prompt(seed=10)
    out = llama_client.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), out[0])


def test_long_prompt_is_sent_in_chunks(llama_ckpt, llama_swarm, local_model):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=llama_swarm.initial_peers, max_prefill_tokens=7
    )
    try:
        ids = prompt(length=30, seed=11)
        out_remote = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out_remote, local_model(llama_ckpt).generate(ids, max_new_tokens=8, do_sample=False))
    finally:
        model.shutdown()


def test_concurrent_sessions_match_running_alone(llama_client):
    prompts = [prompt(seed=20), prompt(length=9, seed=21)]
    alone = [llama_client.generate(p, max_new_tokens=24, min_new_tokens=24, do_sample=False) for p in prompts]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = llama_client.generate(prompts[i], max_new_tokens=24, min_new_tokens=24, do_sample=False)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i], alone[i])


def test_missing_blocks_fail_with_a_clear_error(llama_ckpt, llama_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=llama_swarm.initial_peers, dht_prefix="nobody-serves-this", discovery_timeout=2
    )
    try:
        with pytest.raises(NoRouteError, match=r"block\(s\) 0-3 of nobody-serves-this"):
            model(prompt())
    finally:
        model.shutdown()


def test_sigterm_announces_offline_and_exits_zero(llama_ckpt, llama_swarm, llama_client):
    peer = llama_swarm.start_peer(
        (1, 3),
        extra_args=["--public-name", "leaving-peer", "--announce-period", "1", "--record-ttl", "8"],
        name="leaving",
    )
    sequence = llama_client.model.sequence
    peer_id = peer.info["peer_id"]

    def records() -> list:
        servers = fetch_block_servers(sequence.dht, sequence.prefix, [1, 2])
        return [s for found in servers.values() for s in found if s.peer_id.to_base58() == peer_id]

    first = wait_until(lambda: [s for s in records() if s.record.state == "online"], "the peer's records appear")
    assert all(s.expiration <= get_dht_time() + 8 for s in first), "records must expire unless refreshed"
    assert first[0].record.public_name == "leaving-peer"
    # Past the first records' expiration, only the periodic refresh keeps the records alive.
    expired_at = max(s.expiration for s in first)

    def alive_past_first_ttl() -> bool:
        mine = records()
        online = {s.block for s in mine if s.record.state == "online"} == {1, 2}
        return get_dht_time() > expired_at and online

    wait_until(alive_past_first_ttl, "the records are refreshed: still online after the first ones expired")
    assert llama_swarm.stop_peer(peer) == 0
    # The offline records live one TTL (8 s): long enough to be read on a loaded machine.
    wait_until(lambda: (mine := records()) and all(s.record.state == "offline" for s in mine), "offline records")
    assert "could not announce going offline" not in peer.log_file.read_text()
    # the client keeps working through the remaining peers
    assert llama_client(prompt()).logits.shape == (1, 12, 512)


def test_num_blocks_takes_the_least_covered_span(llama_swarm):
    extra = llama_swarm.start_peer((0, 2), name="extra-0-2")  # blocks 0-1 now have two servers, 2-3 one
    chooser = llama_swarm.start_peer(None, extra_args=["--num-blocks", "2"], name="chooser")
    try:
        assert chooser.info["blocks"] == [2, 4]
    finally:
        assert llama_swarm.stop_peer(chooser) == 0
        assert llama_swarm.stop_peer(extra) == 0


def test_tied_embeddings_checkpoint_matches_local(tmp_path, local_model):
    # Llama 3.2 1B, Qwen2 0.5B and others tie the LM head to the embeddings: the checkpoint has no lm_head.weight.
    from model_tools import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp_path / "tiny-tied", "qwen2", seed=3, tie_word_embeddings=True)
    swarm = start_swarm(ckpt, peers=1, spans=[(0, 4)])
    model = None
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=swarm.initial_peers)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        ids = prompt(batch=2, length=9, seed=12)
        with torch.no_grad():
            remote, local = model(ids).logits, local_model(ckpt)(ids).logits
        assert torch.allclose(remote, local, atol=1e-4, rtol=0), (remote - local).abs().max()
    finally:
        if model is not None:
            model.shutdown()
        swarm.stop_checked()


def test_allowed_and_blocked_peers_shape_the_route(llama_ckpt, llama_swarm):
    first, second = (p.info["peer_id"] for p in llama_swarm.peers[:2])
    trusting = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=llama_swarm.initial_peers, allowed_peers=[first, second]
    )
    try:
        assert [s.peer_id.to_base58() for s in trusting.model.sequence.make_route()] == [first, second]
    finally:
        trusting.shutdown()
    wary = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=llama_swarm.initial_peers, blocked_peers=[second], discovery_timeout=1
    )
    try:
        with pytest.raises(NoRouteError, match=r"block\(s\) 2-3"):
            wary.model.sequence.make_route()
    finally:
        wary.shutdown()
