"""Benchmark: one client's abuse against another's service, and the peer's peak memory against its stated bound.

Starts one peer (the bench-small model by default, all blocks) with a memory budget, and two clients with their own
peer IDs. The honest client runs single-token steps of an inference session, first alone, then while the abusive
client floods the peer (several concurrent [32, L] forwards, abandoned forwards, half-sent frames, huge LoRA
requests, sessions up to its quota). Prints one JSON object: the honest step latency p50/max unloaded and under the
flood, the refusals the abuser got, the peer's peak RSS (VmHWM) and the bound of peers.quotas.rss_bound.

    python scripts/bench_quotas.py [--model bench-small] [--seconds 20] [--memory-budget-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from hivemind.p2p import P2P, PeerID

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from blocks.adapters import Adapters, lora_name  # noqa: E402
from peers.quotas import held_graph_bytes, rss_bound  # noqa: E402
from peers.wire import FORWARD_HANDLER, Forward, send_message  # noqa: E402
from swarm import AutoDistributedModelForCausalLM, PeerError  # noqa: E402
from swarm.transport import InferenceStream, call_forward, call_info  # noqa: E402

STREAM_BUFFER_BYTES = 2 * 64 * 1024  # a stream's read and write buffers beyond the frame charged to the budget


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-small", choices=sorted(PRESETS))
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood")
    parser.add_argument("--memory-budget-mib", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--cache-tokens", type=int, default=8192)
    args = parser.parse_args()
    preset = PRESETS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_checkpoint(Path(tmp) / args.model, "llama", seed=0, **preset)
        budget = args.memory_budget_mib * 1024**2
        settings = {
            "--max-length": args.max_length,
            "--cache-tokens": args.cache_tokens,
            "--memory-budget": budget,
            "--max-message-bytes": budget // 8,
            "--max-client-request-bytes": budget // 2,
            "--max-client-trainable-bytes": budget // 8,
            "--max-streams": 256,
            "--max-client-streams": 32,
            "--frame-timeout": 5,
            "--num-threads": 1,
        }
        extra = ["--log-level", "WARNING"] + [str(x) for pair in settings.items() for x in pair]
        swarm = LocalSwarm(path, peers=1, threads_per_peer=1, extra_args=extra).start()
        try:
            print(json.dumps(run(swarm, path, preset, settings, args)), flush=True)
        finally:
            swarm.stop_checked()


def run(swarm: LocalSwarm, path: Path, preset: dict, settings: dict, args: argparse.Namespace) -> dict:
    pid = swarm.peers[0].process.pid
    baseline = psutil.Process(pid).memory_info().rss
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
    loop, honest = model.model.sequence.loop, model.model.sequence.p2p
    abuser: P2P = loop.run(P2P.create(initial_peers=swarm.initial_peers))
    peer = PeerID.from_base58(swarm.peers[0].info["peer_id"])
    hidden_size, n_blocks, length = preset["hidden_size"], preset["num_hidden_layers"], args.max_length
    refusals: collections.Counter[str] = collections.Counter()

    def steps(stream: InferenceStream, first: int, count: int) -> list[float]:
        out = []
        for position in range(first, first + count):
            began = time.perf_counter()
            loop.run(stream.step(torch.randn(1, 1, hidden_size), position))
            out.append(time.perf_counter() - began)
        return out

    def refused(e: Exception) -> None:
        text = str(e)
        key = text.split(" exceeded")[0].split("quota of ")[-1] if "quota of" in text else text[:60]
        refusals[key] += 1

    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                loop.run(
                    call_forward(abuser, peer, Forward(0, n_blocks, torch.randn(32, length, hidden_size)), 10**9, 120)
                )
            except PeerError as e:
                refused(e)

    def abandon() -> None:  # forwards sent, then the stream closed before the answer
        async def once() -> None:
            _, _, writer = await abuser.call_binary_stream_handler(peer, FORWARD_HANDLER)
            await send_message(Forward(0, n_blocks, torch.randn(16, length, hidden_size)).encode(), writer)
            await asyncio.sleep(0.2)
            writer.close()

        while not stop.is_set():
            try:
                loop.run(once())
            except Exception as e:  # refused mid-send (a quota): the peer closed the stream
                refused(e)

    def half_sent() -> None:  # frames promising bytes that never come
        async def once():
            _, _, writer = await abuser.call_binary_stream_handler(peer, FORWARD_HANDLER)
            writer.write(b"\x00" + (10**6).to_bytes(8, "big") + b"x" * 100)
            await writer.drain()
            return writer

        writers = []
        while not stop.is_set():
            try:
                writers.append(loop.run(once()))
            except Exception as e:
                refused(e)
            time.sleep(0.05)
        for writer in writers:
            writer.close()

    def big_lora() -> None:  # per-example LoRA on every block's MLP: refused by the trainable quota
        tensors = {}
        for block in range(n_blocks):
            for module in ("gate_proj", "up_proj"):
                tensors[lora_name(block, module, "A")] = torch.randn(8, 64, hidden_size) * 0.01
                tensors[lora_name(block, module, "B")] = torch.randn(8, preset["intermediate_size"], 64) * 0.01
        request = Forward(0, n_blocks, torch.randn(8, 16, hidden_size), Adapters(tensors))
        while not stop.is_set():
            try:
                loop.run(call_forward(abuser, peer, request, 10**9, 120))
            except PeerError as e:
                refused(e)

    stream = InferenceStream(honest, peer, 0, n_blocks, 10**9, timeout=120)
    loop.run(stream.open(length, 1, connect_timeout=60, adapters=Adapters()))
    steps(stream, 0, 5)  # warm-up
    unloaded = steps(stream, 5, 30)
    hoarded = []
    for _ in range(20):  # sessions up to the abuser's quota
        s = InferenceStream(abuser, peer, 0, n_blocks, 10**9, timeout=60)
        try:
            loop.run(s.open(length, 1, connect_timeout=60, adapters=Adapters()))
            hoarded.append(s)
        except PeerError as e:
            refused(e)
    threads = [threading.Thread(target=fn, daemon=True) for fn in (flood, flood, flood, abandon, half_sent, big_lora)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # let the flood fill the queue
    loaded = []
    began, position = time.monotonic(), 35
    while time.monotonic() - began < args.seconds and position + 1 < length:
        loaded += steps(stream, position, 1)
        position += 1
    info = loop.run(call_info(honest, peer, timeout=60))
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    for s in hoarded:
        loop.run(s.close())
    loop.run(stream.close())
    loop.run(abuser.shutdown())
    model.shutdown()
    peak = peak_rss(pid)
    dtype_bytes = 4
    kv_per_token = 2 * n_blocks * preset["hidden_size"] * dtype_bytes  # K and V, every block (kv heads = heads)
    compute = held_graph_bytes(
        16384, length, n_blocks, hidden_size, preset["intermediate_size"], preset["num_attention_heads"], dtype_bytes
    )  # the largest single computation: a backward of --max-backward-tokens
    bound = rss_bound(
        baseline,
        0,  # the weights are in the baseline: the peer loaded them before it reported ready
        settings["--cache-tokens"],
        kv_per_token,
        settings["--memory-budget"],
        compute,
        settings["--max-streams"],
        STREAM_BUFFER_BYTES,
    )
    mib = 1024**2
    return {
        "model": args.model,
        "honest_step_ms": {
            "unloaded_p50": round(statistics.median(unloaded) * 1e3, 2),
            "unloaded_max": round(max(unloaded) * 1e3, 2),
            "flood_p50": round(statistics.median(loaded) * 1e3, 2),
            "flood_max": round(max(loaded) * 1e3, 2),
            "flood_steps": len(loaded),
        },
        "abuser_refusals": dict(refusals),
        "peer_stats": {k: info.stats.get(k) for k in ("memory_budget_peak", "forward_calls", "errors")},
        "peer_rss_mib": {
            "baseline_after_load": round(baseline / mib, 1),
            "peak": round(peak / mib, 1),
            "bound": round(bound / mib, 1),
            "bound_terms": {
                "cache": round(settings["--cache-tokens"] * kv_per_token / mib, 1),
                "memory_budget": round(settings["--memory-budget"] / mib, 1),
                "compute": round(compute / mib, 1),
                "streams": round(settings["--max-streams"] * STREAM_BUFFER_BYTES / mib, 1),
            },
        },
    }


if __name__ == "__main__":
    main()
