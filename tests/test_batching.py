"""Continuous batching on peers: concurrent sessions share forwards and still get exactly what they get alone."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from conftest import start_swarm, wait_until

from blocks.batching import Segment, run_segments
from blocks.checkpoint import open_checkpoint
from blocks.span import load_span
from peers.scheduler import BatchSettings, Candidate, ComputeScheduler, select_batch
from peers.wire import Step
from swarm import AutoDistributedModelForCausalLM
from swarm.transport import call_info


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))


# ---- the batched forward itself (no network) ----


@pytest.mark.parametrize("ckpt_name", ["llama_ckpt", "qwen2_ckpt"])
@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_batched_steps_equal_steps_alone(ckpt_name, quant, request):
    """Sessions of different batch sizes, lengths and positions, some prefilling while others decode."""
    span = load_span(open_checkpoint(request.getfixturevalue(ckpt_name)), 0, 4, quant=quant, progress=False)
    gen = torch.Generator().manual_seed(0)
    rows, lengths = [1, 2, 1, 3], [5, 9, 1, 4]
    alone = [span.new_cache() for _ in rows]
    batched = [span.new_cache() for _ in rows]
    positions = [0] * len(rows)
    worst = 0.0
    with torch.inference_mode():
        for step in range(5):
            # the third session starts late (its prompt comes in step 2), the others decode meanwhile
            tokens = [lengths[i] if step == 0 else 1 for i in range(len(rows))]
            if step == 2:
                tokens[2] = 6
            inputs = [torch.randn(b, t, span.hidden_size, generator=gen) for b, t in zip(rows, tokens, strict=True)]
            expected = [span(x, c, p) for x, c, p in zip(inputs, alone, positions, strict=True)]
            segments = [
                Segment(c, x.shape[0], x.shape[1], p) for x, c, p in zip(inputs, batched, positions, strict=True)
            ]
            got = run_segments(span, inputs, segments, 0, 4)
            for e, g in zip(expected, got, strict=True):
                assert g.shape == e.shape
                worst = max(worst, float((e - g).abs().max()))
            positions = [p + t for p, t in zip(positions, tokens, strict=True)]
    # float32: the same products over more rows round differently by ~1e-7; int8 quantizes each row on its own, nf4
    # dequantizes the same weights whatever the rows
    assert worst < 1e-5, worst


def test_batched_step_refuses_a_cache_of_the_wrong_length(llama_ckpt):
    span = load_span(open_checkpoint(llama_ckpt), 0, 2, progress=False)
    cache = span.new_cache()
    x = torch.randn(1, 3, span.hidden_size)
    with torch.inference_mode():
        run_segments(span, [x], [Segment(cache, 1, 3, 0)], 0, 2)
        with pytest.raises(Exception, match="holds 3 tokens where 5 were expected"):
            run_segments(span, [x[:, :1]], [Segment(cache, 1, 1, 5)], 0, 2)


# ---- choosing a batch (pure) ----


def test_select_batch_round_robin_and_client_share():
    settings = BatchSettings(max_batch_tokens=8, max_batch_sessions=4, client_share=0.5)
    greedy = [Candidate("a", 0, 1)] * 6 + [Candidate("b", 0, 1)]
    # "a" came first with six steps, "b" with one: b still gets a place, and a stops at half the tokens
    chosen = select_batch(greedy, settings)
    assert [greedy[i].client for i in chosen].count("b") == 1 and len(chosen) == 4
    # alone, a client may fill the batch up to its limits
    assert len(select_batch([Candidate("a", 0, 1)] * 6, settings)) == 4
    # the oldest step runs even if larger than the batch; only its group joins
    mixed = [Candidate("a", 0, 20), Candidate("b", 1, 1), Candidate("c", 0, 1)]
    assert select_batch(mixed, settings) == [0]
    assert select_batch([Candidate("a", 0, 3), Candidate("b", 1, 1), Candidate("c", 0, 2)], settings) == [0, 2]
    # no batching
    assert select_batch(greedy, BatchSettings(max_batch_sessions=1)) == [0]


def test_a_lone_small_step_skips_the_queue_and_anything_else_goes_through_it():
    """The fast path (ComputeScheduler._step_now) computes what the queue would, with the same checks, and is taken
    only when nothing waits or runs, one session is open and the step is small."""

    async def scenario() -> None:
        scheduler = ComputeScheduler(BatchSettings(inline_tokens=4), lambda inputs: [x * 10 for x in inputs])
        sessions = 1
        scheduler.open_sessions = lambda: sessions
        assert await scheduler.step(lambda: 3, 1, "g", "a", session="s1") == 30
        assert scheduler._worker is None and scheduler.batches == 1  # no worker task: no turn through the queue

        def refuse() -> None:
            raise RuntimeError("not serving these blocks")

        with pytest.raises(RuntimeError, match="not serving"):
            await scheduler.step(lambda: 3, 1, "g", "a", check=refuse, session="s1")
        with pytest.raises(ValueError, match="cache"):
            await scheduler.step(lambda: (_ for _ in ()).throw(ValueError("cache too short")), 1, "g", "a")
        assert scheduler.batches == 1  # neither computed anything

        assert await scheduler.step(lambda: 4, 5, "g", "a", session="s1") == 40  # over inline_tokens: queued
        assert scheduler._worker is not None and scheduler.batches == 2
        scheduler._worker.cancel()
        scheduler._worker = None
        sessions = 2  # another session is open: its step may share the batch
        assert await scheduler.step(lambda: 5, 1, "g", "a", session="s1") == 50
        assert scheduler._worker is not None
        scheduler._worker.cancel()
        scheduler._worker = None

        sessions = 1
        async with scheduler.exclusive():  # e.g. the peer is swapping its blocks: the step waits for the lock
            waiting = asyncio.ensure_future(scheduler.step(lambda: 6, 1, "g", "a", session="s1"))
            await asyncio.sleep(0.01)
            assert not waiting.done()
        assert await waiting == 60
        scheduler.shutdown()

    asyncio.run(scenario())


# ---- through a real peer ----


@pytest.fixture(scope="module")
def one_peer(llama_ckpt):
    swarm = start_swarm(llama_ckpt, peers=1, spans=[(0, 4)], extra_args=["--inline-compute-tokens", "0"])
    yield swarm
    swarm.stop_checked()


def _generate_concurrently(model, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Each prompt in its own thread (its own inference session), started in a staggered order.

    Every other thread runs under torch.inference_mode, as a user's serving code often does: the sessions' replay
    buffers must work whichever mode the thread that created them was in."""
    results: list[torch.Tensor | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    started = [threading.Event() for _ in prompts]

    def run(i: int) -> None:
        try:
            if i > 0:
                started[i - 1].wait(60)
            started[i].set()
            with torch.inference_mode(i % 2 == 1):
                results[i] = model.generate(
                    prompts[i], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def test_concurrent_sessions_match_local_and_share_batches(one_peer, llama_ckpt, local_model):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=one_peer.initial_peers)
    try:
        sequence = model.model.sequence
        peer_id = sequence.make_route()[0].peer_id
        before = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0)).stats
        prompts = [prompt(length, seed) for seed, length in enumerate([3, 17, 8, 30, 5, 12])]
        outputs = _generate_concurrently(model, prompts, 24)
        for p, out in zip(prompts, outputs, strict=True):
            expected = local_model(llama_ckpt).generate(p, max_new_tokens=24, min_new_tokens=24, do_sample=False)
            assert torch.equal(out, expected)
        after = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0)).stats
        batches = after["batches"] - before["batches"]
        steps = after["batched_steps"] - before["batched_steps"]
        assert steps > batches > 0, (steps, batches)  # some forwards carried several sessions' steps
    finally:
        model.shutdown()


def test_failing_and_abandoned_sessions_end_only_themselves(one_peer, llama_ckpt, local_model):
    """While one session generates, another sends a step the peer refuses, and a third sends a long prompt (several
    chunks) and leaves at once: the generating session still gets exactly its tokens."""
    from swarm import PeerError
    from swarm.inference import InferenceSession

    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=one_peer.initial_peers)
    try:
        good_prompt = prompt(10, 7)
        expected = local_model(llama_ckpt).generate(good_prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        outcomes: list[str] = []

        def misbehave() -> None:
            loop = model.model.sequence.loop
            refused = InferenceSession(model.model.sequence, 16).open()
            try:
                loop.run(refused._streams[0].step(torch.randn(1, 1, 65), 0))  # wrong hidden size
            except PeerError as e:
                outcomes.append(f"refused: {e}")
            leaving = InferenceSession(model.model.sequence, 1024).open()
            stream = leaving._streams[0]
            loop.run(stream.send(Step(torch.randn(1, 900, 64), 0)))
            leaving.close()  # gone before the prompt's chunks are computed
            outcomes.append("left")

        thread = threading.Thread(target=misbehave)
        thread.start()
        out = model.generate(good_prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        thread.join(120)
        assert len(outcomes) == 2 and "hidden size must be 64" in outcomes[0], outcomes
        assert torch.equal(out, expected)
        assert torch.equal(model.generate(good_prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False), expected)
    finally:
        model.shutdown()


def test_concurrent_forwards_are_batched_and_exact(one_peer, llama_ckpt, local_model):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=one_peer.initial_peers)
    try:
        sequence = model.model.sequence
        peer_id = sequence.make_route()[0].peer_id
        before = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0)).stats
        inputs = [torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(s)) for s in range(6)]
        logits: list[torch.Tensor | None] = [None] * len(inputs)

        def run(i: int) -> None:
            with torch.no_grad():
                logits[i] = model(inputs[i]).logits

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for ids, got in zip(inputs, logits, strict=True):
            with torch.no_grad():
                expected = local_model(llama_ckpt)(ids).logits
            assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
        after = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0)).stats
        assert after["forward_calls"] - before["forward_calls"] == len(inputs)
        assert after["batched_steps"] - before["batched_steps"] == len(inputs)  # all went through batches
    finally:
        model.shutdown()


def test_peer_reports_batch_size_and_queue(one_peer, llama_ckpt):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=one_peer.initial_peers)
    try:
        sequence = model.model.sequence
        peer_id = sequence.make_route()[0].peer_id
        _generate_concurrently(model, [prompt(4, s) for s in range(4)], 12)
        info = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0))
        assert info.batch_sessions >= 1 and info.queue_length == 0
    finally:
        model.shutdown()


def test_flood_of_sessions_stays_within_the_cache_budget(llama_ckpt, tmp_path: Path):
    """Many sessions at once: the budget refuses what does not fit, the rest run, nothing is held afterwards."""
    swarm = start_swarm(llama_ckpt, peers=1, spans=[(0, 4)], extra_args=["--cache-tokens", "256"])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=swarm.initial_peers, max_failovers=0, discovery_timeout=5
    )
    try:
        sequence = model.model.sequence
        peer_id = sequence.make_route()[0].peer_id
        opened, refused = [], 0
        for _ in range(12):
            try:
                opened.append(_open(model, 32))
            except Exception:
                refused += 1
        assert len(opened) == 256 // 32 and refused == 12 - 256 // 32
        info = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0))
        assert info.cache_tokens_left == 0
        for session in opened:
            session.close()
        wait_until(
            lambda: sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0)).cache_tokens_left == 256,
            "closed sessions give their cache back",
        )
    finally:
        model.shutdown()
        swarm.stop_checked()


def _open(model, max_length: int):
    from swarm.inference import InferenceSession

    return InferenceSession(model.model.sequence, max_length).open()
