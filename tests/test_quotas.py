"""Per-client quotas, fair scheduling across clients and the memory budget: the pure rules first, then a real peer
spoken to by two clients (two P2P identities)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest
import torch
from conftest import start_swarm, wait_until
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from blocks.adapters import Adapters, lora_name
from peers.quotas import (
    MESSAGE_COPIES,
    ClientLedger,
    ClientQuotas,
    Holding,
    MemoryBudgetExceeded,
    QuotaExceeded,
    Resource,
    rss_bound,
)
from peers.scheduler import BatchSettings, ComputeScheduler, FairShare
from peers.wire import FORWARD_HANDLER, Forward, receive_message, send_message
from peers.wire.framing import FrameTimeoutError, MessageTooLargeError
from swarm import AutoDistributedModelForCausalLM, PeerError
from swarm.transport import InferenceStream, call_forward, call_info

# ---- the ledger and the byte budget (pure) ----


def ledger(**per_client: int) -> ClientLedger:
    return ClientLedger(ClientQuotas(per_client=per_client, total={Resource.STREAMS: 5}, memory_budget=1000))


def test_one_client_cannot_take_more_than_its_sessions_while_another_still_can():
    book = ledger(sessions=2, cache_tokens=100)
    book.take("a", Resource.SESSIONS, 1)
    book.take("a", Resource.SESSIONS, 1)
    with pytest.raises(QuotaExceeded, match=r"sessions exceeded: 2 held \+ 1 asked > limit 2 \(--max-client-sessions"):
        book.take("a", Resource.SESSIONS, 1)
    book.take("b", Resource.SESSIONS, 1)  # another client is not affected
    book.take("a", Resource.CACHE_TOKENS, 60)
    with pytest.raises(QuotaExceeded, match="--max-client-cache-tokens") as refused:
        book.take("a", Resource.CACHE_TOKENS, 41)
    assert (refused.value.resource, refused.value.limit, refused.value.used) == (Resource.CACHE_TOKENS, 100, 60)
    assert book.held("a", Resource.CACHE_TOKENS) == 60  # a refusal takes nothing
    book.take("b", Resource.CACHE_TOKENS, 100)


def test_total_stream_limit_and_byte_budget_are_shared_by_all_clients():
    book = ledger(request_bytes=800)
    for client in "abcde":
        book.take(client, Resource.STREAMS, 1)
    with pytest.raises(QuotaExceeded, match=r"the peer's quota of streams .* \(--max-streams\)"):
        book.take("f", Resource.STREAMS, 1)
    book.take("a", Resource.REQUEST_BYTES, 600)
    book.take("b", Resource.TRAINABLE_BYTES, 300)  # no per-client limit on it here, but the budget counts it
    with pytest.raises(MemoryBudgetExceeded, match=r"900 held \+ 200 asked > limit 1000 \(--memory-budget\)"):
        book.take("c", Resource.REQUEST_BYTES, 200)
    assert book.budget.used == 900 and book.budget.peak == 900
    book.give_back("a", Resource.REQUEST_BYTES, 600)
    book.take("c", Resource.REQUEST_BYTES, 200)
    assert book.budget.used == 500


def test_a_holding_gives_everything_back_once_however_the_stream_ended():
    book = ledger(streams=3, trainable_bytes=500)
    holding = Holding(book, "a")
    holding.take(Resource.STREAMS, 1)
    holding.take(Resource.TRAINABLE_BYTES, 400)
    holding.take(Resource.HELD_BYTES, 100)
    with pytest.raises(QuotaExceeded, match="--max-client-trainable-bytes"):
        holding.take(Resource.TRAINABLE_BYTES, 101)
    holding.give_back(Resource.TRAINABLE_BYTES, 10_000)  # never more than it holds
    assert book.held("a", Resource.TRAINABLE_BYTES) == 0 and book.budget.used == 100
    holding.close()
    holding.close()
    assert book.clients == 0 and book.budget.used == 0 and book.total(Resource.STREAMS) == 0


def test_rss_bound_is_the_sum_of_its_terms():
    bound = rss_bound(100, 20, cache_tokens=10, kv_bytes_per_token=3, memory_budget=7, compute_bytes=5, max_streams=2,
                      stream_buffer_bytes=4)  # fmt: skip
    assert bound == 100 + 20 + 30 + 7 + 5 + 8


# ---- fair scheduling (pure, then the scheduler with real threads but no network) ----


def test_fair_share_puts_a_small_step_ahead_of_a_flood_of_large_forwards():
    fair = FairShare()
    flood = [("flood1", 4096.0), ("flood2", 4096.0), ("flood3", 4096.0)] * 3
    order = []
    pending = list(flood)
    for turn in range(6):
        if turn == 2:
            pending.append(("honest", 16.0))
        i = fair.pick(pending)
        client, cost = pending.pop(i)
        fair.charge({client: cost})
        order.append(client)
    # the step runs at the first choice after it arrived, before any flood client's second forward
    assert order[2] == "honest"
    assert order[:2] == ["flood1", "flood2"] and order[3] == "flood3"


def test_fair_share_alternates_equal_clients_and_gives_no_credit_for_idle_time():
    fair = FairShare()
    for _ in range(100):
        fair.charge({"busy": 10.0})
    # a newcomer starts at the current virtual time: it does not get 100 turns in a row
    pending = [("busy", 10.0)] * 4 + [("new", 10.0)] * 4
    order = []
    for _ in range(6):
        i = fair.pick(pending)
        order.append(pending[i][0])
        fair.charge({pending[i][0]: pending[i][1]})
        pending.pop(i)
    assert order.count("new") == 3 and order.count("busy") == 3
    assert fair.clients <= 2


def test_scheduler_runs_another_clients_job_next_and_drops_cancelled_work():
    async def scenario() -> tuple[list[str], int]:
        scheduler = ComputeScheduler(BatchSettings(), lambda inputs: inputs)
        ran: list[str] = []
        started = asyncio.Event()

        def job(name: str) -> str:
            time.sleep(0.02)
            ran.append(name)
            return name

        flood = [asyncio.ensure_future(scheduler.run(lambda i=i: job(f"f{i}"), 1000, client="flood")) for i in range(8)]
        await asyncio.sleep(0.005)
        started.set()
        honest = await scheduler.run(lambda: job("honest"), 10, client="honest")
        assert honest == "honest"
        for task in flood[4:]:  # the flood's client left: its queued work is cancelled
            task.cancel()
        await asyncio.gather(*flood[:4])
        await asyncio.sleep(0.1)
        scheduler.shutdown()
        return ran, scheduler.queue_length

    ran, left = asyncio.run(scenario())
    assert ran.index("honest") <= 1, ran  # after at most the job already running
    assert len(ran) == 5 and left == 0, ran  # cancelled jobs never ran


# ---- frames (asyncio streams, no network) ----


def _reader(data: bytes, eof: bool = False) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_a_half_sent_frame_times_out():
    async def scenario() -> float:
        reader = _reader(b"\x00" + (1000).to_bytes(8, "big") + b"x" * 10)  # promises 1000 bytes, sends 10
        began = time.monotonic()
        with pytest.raises(FrameTimeoutError, match="did not arrive whole within 0.2 s"):
            await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=10**6, frame_timeout=0.2)
        return time.monotonic() - began

    assert asyncio.run(scenario()) < 2.0


def test_a_frame_is_charged_before_its_payload_is_read():
    book = ledger(request_bytes=4000)
    holding = Holding(book, "a")
    charge = lambda length: holding.take(Resource.REQUEST_BYTES, MESSAGE_COPIES * length)  # noqa: E731
    payload = runtime_pb2.ExpertRequest(uid="x" * 2000).SerializeToString()

    async def scenario() -> None:
        # nothing of the payload was sent: the refusal comes from the header alone
        reader = _reader(b"\x00" + len(payload).to_bytes(8, "big"))
        with pytest.raises(QuotaExceeded, match="request_bytes"):
            await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=10**6, on_length=charge)
        with pytest.raises(MessageTooLargeError):
            await receive_message(_reader(b"\x00" + (10**7).to_bytes(8, "big")), runtime_pb2.ExpertRequest,
                                  max_bytes=10**6, on_length=charge)  # fmt: skip
        small = runtime_pb2.ExpertRequest(uid="ok").SerializeToString()
        reader = _reader(b"\x00" + len(small).to_bytes(8, "big") + small, eof=True)
        assert (await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=10**6, on_length=charge)).uid == "ok"

    asyncio.run(scenario())
    assert holding.held(Resource.REQUEST_BYTES) == MESSAGE_COPIES * 4


# ---- a real peer and two clients ----

HIDDEN = 64
SLICE = 48  # --compute-slice-tokens: a [32, 48] forward is 32 slices
MEMORY_BUDGET = 8 * 1024**2
PEER_ARGS = {
    "--max-length": 48,
    "--max-batch": 32,
    "--max-sessions": 8,
    "--cache-tokens": 1000,
    "--max-client-sessions": 2,
    "--max-client-cache-tokens": 100,
    "--max-client-trainable-bytes": 200_000,
    "--max-client-request-bytes": 16 * 1024**2,
    "--memory-budget": MEMORY_BUDGET,
    "--max-message-bytes": 4 * 1024**2,
    "--frame-timeout": 2,
    "--session-idle-timeout": 4,
    "--compute-slice-tokens": SLICE,
}


class Clients:
    """Two clients of one peer: `a` is a full client (a model), `b` its own P2P instance (another peer ID)."""

    def __init__(self, swarm, model):
        self.swarm, self.model = swarm, model
        self.loop = model.model.sequence.loop
        self.a: P2P = model.model.sequence.p2p
        self.b: P2P = self.loop.run(P2P.create(initial_peers=swarm.initial_peers))
        self.peer = PeerID.from_base58(swarm.peers[0].info["peer_id"])

    def run(self, coro):
        return self.loop.run(coro)

    def stats(self) -> dict:
        return self.run(call_info(self.a, self.peer, timeout=30)).stats

    def info(self):
        return self.run(call_info(self.a, self.peer, timeout=30))

    def open(self, p2p: P2P, max_length: int = 8, batch: int = 1) -> InferenceStream:
        stream = InferenceStream(p2p, self.peer, 0, 4, 10**8, timeout=30)
        self.run(stream.open(max_length, batch, connect_timeout=30, adapters=Adapters()))
        return stream


@pytest.fixture(scope="module")
def clients(llama_ckpt):
    args = [str(x) for pair in PEER_ARGS.items() for x in pair]
    swarm = start_swarm(llama_ckpt, peers=1, spans=[(0, 4)], extra_args=args)
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=swarm.initial_peers)
    both = Clients(swarm, model)
    yield both
    both.run(both.b.shutdown())
    model.shutdown()
    swarm.stop_checked()


def test_session_and_cache_quotas_are_per_client(clients):
    held = [clients.open(clients.a), clients.open(clients.a)]
    try:
        with pytest.raises(PeerError, match=r"quota of sessions exceeded: 2 held \+ 1 asked > limit 2"):
            clients.open(clients.a)
        other = clients.open(clients.b)  # another client still gets a session
        clients.run(other.close())
    finally:
        for stream in held:
            clients.run(stream.close())
    # a closed stream frees its quota when the peer sees the end of it: wait for that, not for our close()
    wait_until(lambda: clients.info().sessions == 0, "sessions closed")
    with pytest.raises(PeerError, match=r"cache_tokens exceeded: 0 held \+ 144 asked > limit 100"):
        clients.open(clients.b, max_length=48, batch=3)
    wait_until(lambda: clients.info().sessions == 0, "sessions closed")


def test_trainables_and_oversized_messages_are_refused_before_they_are_kept(clients):
    # per-example LoRA of 4 blocks x batch 8: 4 x 8 x 2 x 16 x 64 x 4 bytes = 262 KB > the client's 200 KB
    batch, rank = 8, 16
    tensors = {}
    for block in range(4):
        tensors[lora_name(block, "q_proj", "A")] = torch.randn(batch, rank, HIDDEN) * 0.01
        tensors[lora_name(block, "q_proj", "B")] = torch.randn(batch, HIDDEN, rank) * 0.01
    request = Forward(0, 4, torch.randn(batch, 4, HIDDEN), Adapters(tensors))
    with pytest.raises(PeerError, match=r"trainable_bytes exceeded: .* > limit 200000 \(--max-client-trainable"):
        clients.run(call_forward(clients.b, clients.peer, request, 10**8, timeout=30))

    # a frame whose copies would not fit the memory budget is refused from its header, before its payload is sent
    async def header_only() -> str:
        _, reader, writer = await clients.b.call_binary_stream_handler(clients.peer, FORWARD_HANDLER)
        try:
            writer.write(b"\x00" + (3 * 1024**2).to_bytes(8, "big"))
            await writer.drain()
            try:
                await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=10**6)
            except Exception as e:
                return str(e)
            return "no error"
        finally:
            writer.close()

    assert "> limit 8388608 (--memory-budget)" in clients.run(header_only())
    wait_until(lambda: clients.stats()["memory_budget_used"] == 0, "the budget given back")


def test_half_sent_streams_and_idle_sessions_time_out(clients):
    async def half_sent() -> tuple[str, float]:
        _, reader, writer = await clients.b.call_binary_stream_handler(clients.peer, FORWARD_HANDLER)
        began = time.monotonic()
        try:
            writer.write(b"\x00" + (1000).to_bytes(8, "big") + b"x" * 10)  # promises 1000 bytes, sends 10
            await writer.drain()
            try:
                await asyncio.wait_for(receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=10**6), 30)
            except Exception as e:
                return str(e), time.monotonic() - began
            return "no error", 0.0
        finally:
            writer.close()

    idle = clients.open(clients.b)
    message, waited = clients.run(half_sent())
    # the frame's own deadline or the first request's (both --frame-timeout), whichever the peer notices first
    assert ("did not arrive whole within 2" in message or "nothing arrived within" in message) and waited < 10
    wait_until(lambda: clients.stats()["open_streams"] == 0, "the half-sent stream and the idle session closed")
    assert clients.info().sessions == 0
    with pytest.raises(PeerError):
        clients.run(idle.step(torch.randn(1, 1, HIDDEN), 0))
    clients.run(idle.close())


def _flood(clients: Clients, stop: threading.Event, senders: int = 3) -> list[threading.Thread]:
    """`senders` loops of [32, 48] forwards from client b until `stop`."""
    hidden = torch.randn(32, 48, HIDDEN)

    def send() -> None:
        while not stop.is_set():
            try:
                clients.run(call_forward(clients.b, clients.peer, Forward(0, 4, hidden), 10**8, timeout=60))
            except PeerError:  # a quota may refuse one: the flood goes on
                pass

    threads = [threading.Thread(target=send, daemon=True) for _ in range(senders)]
    for thread in threads:
        thread.start()
    return threads


def _step_latencies(clients: Clients, stream: InferenceStream, first: int, count: int) -> list[float]:
    latencies = []
    for position in range(first, first + count):
        began = time.perf_counter()
        clients.run(stream.step(torch.randn(1, 1, HIDDEN), position))
        latencies.append(time.perf_counter() - began)
    return latencies


def test_a_flood_of_forwards_from_one_client_leaves_another_clients_steps_fast(clients):
    stream = clients.open(clients.a, max_length=48)
    try:
        unloaded = _step_latencies(clients, stream, 0, 15)
        began = time.perf_counter()
        clients.run(call_forward(clients.b, clients.peer, Forward(0, 4, torch.randn(32, 48, HIDDEN)), 10**8, 60))
        forward_alone = time.perf_counter() - began
        stop = threading.Event()
        threads = _flood(clients, stop)
        wait_until(lambda: clients.info().queue_length >= 2, "the flood queued")
        loaded = _step_latencies(clients, stream, 15, 15)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        clients.run(stream.close())
    p50_unloaded, p50_loaded = statistics.median(unloaded), statistics.median(loaded)
    print(f"honest step p50 unloaded {p50_unloaded * 1e3:.1f} ms, under the flood {p50_loaded * 1e3:.1f} ms "
          f"(max {max(loaded) * 1e3:.1f} ms); one flood forward alone {forward_alone * 1e3:.1f} ms")  # fmt: skip
    # first-come-first-served would keep each step behind the three queued [32, 48] forwards; fair scheduling keeps
    # it behind at most the slice being computed
    assert p50_loaded < p50_unloaded + 0.5 * forward_alone, (p50_unloaded, p50_loaded, forward_alone)


def test_work_of_a_client_that_left_is_dropped(clients):
    before = clients.stats()
    hidden = torch.randn(32, 48, HIDDEN)
    request = Forward(0, 4, hidden).encode()

    async def send_and_leave() -> None:
        writers = []
        for _ in range(4):
            _, _, writer = await clients.b.call_binary_stream_handler(clients.peer, FORWARD_HANDLER)
            await send_message(request, writer)
            writers.append(writer)
        await asyncio.sleep(0.05)  # the peer reads the requests, then the client is gone
        for writer in writers:
            writer.close()

    clients.run(send_and_leave())
    wait_until(lambda: clients.info().queue_length == 0, "the abandoned work dropped")
    wait_until(lambda: clients.stats()["open_streams"] == 0, "the streams closed")
    after = clients.stats()
    # none of the four 32-slice forwards was computed to the end for nobody
    assert after["forward_calls"] - before["forward_calls"] < 4, (before, after)
    assert after["memory_budget_used"] == 0
