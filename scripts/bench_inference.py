"""Benchmark: greedy generation through a swarm of peers on loopback vs local transformers, same weights, same run.

For each model and peer count it makes a random-weight Llama checkpoint, starts the peers (an even split of the
blocks) on 127.0.0.1 (offering direct connections), and alternates timed runs of greedy tokens through three clients
of the swarm (VARIANTS: the default, over libp2p streams with peer-to-peer push; ``direct=True``, steps and replies
over direct TLS connections, push still through libp2p; the same with steps relayed by the client, ``push=False``)
and through local ``transformers.generate``. It prints one JSON line per (model, peers): tokens/s of each (medians
over repeats), their ratios to local and per-token overheads in ms, whether the direct client's sessions did use
direct connections, the round trip of one info call to a peer over libp2p, and the CPU time per generated token of
every process involved (from psutil, i.e. /proc): the client (all its threads), the client's helper processes
(hivemind's DHT process and libp2p daemon), each peer, and the peers' helper processes, measured over the default
client's runs.

    python scripts/bench_inference.py [--models bench-small bench-110m] [--peers 2 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.transport import call_info  # noqa: E402


class TokenTimes(BaseStreamer):
    """Records when generate() emits each chunk (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(tokens/s over the generated tokens, time to first token, output)."""
    streamer = TokenTimes()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer
        )
    end = time.perf_counter()
    return new_tokens / (end - start), streamer.times[1] - start, out


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU seconds of named groups of processes (a process and its descendants)."""

    def __init__(self, groups: dict[str, list[psutil.Process]]):
        self.groups = groups
        self.totals = dict.fromkeys(groups, 0.0)
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in procs) for name, procs in self.groups.items()}

    def __enter__(self) -> CpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self._read().items():
            self.totals[name] += value - self._start[name]


def rtt_floor_ms(model, samples: int = 30) -> float:
    """Median round trip of an info call (no compute) from the client to its first peer: what one hop through
    hivemind's daemons costs on this machine right now."""
    sequence = model.model.sequence
    peer_id = sequence.make_route()[0].peer_id
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0))
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def process_groups(swarm: LocalSwarm) -> dict[str, list[psutil.Process]]:
    me = psutil.Process()
    groups: dict[str, list[psutil.Process]] = {"client": [me]}
    peer_tree: set[int] = set()
    for i, peer in enumerate(swarm.peers):
        proc = psutil.Process(peer.process.pid)
        groups[f"peer{i}"] = [proc]
        groups[f"peer{i}_helpers"] = proc.children(recursive=True)
        peer_tree |= {p.pid for p in [proc, *groups[f"peer{i}_helpers"]]}
    # the peers are this process's children too: the client's own helpers are the rest
    groups["client_helpers"] = [p for p in me.children(recursive=True) if p.pid not in peer_tree]
    return groups


# Clients compared in one run (the peers offer direct connections): the default (libp2p streams, peer-to-peer push
# through the daemons), direct TLS connections with push, and direct connections with steps relayed by the client.
VARIANTS: dict[str, dict] = {"swarm": {}, "direct": {"direct": True}, "direct_relay": {"direct": True, "push": False}}


def bench_model(name_of_model: str, workdir: Path, args: argparse.Namespace, peers: int) -> dict:
    path = workdir / name_of_model
    if not path.exists():
        make_random_checkpoint(path, "llama", **PRESETS[name_of_model])
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    n_params = sum(p.numel() for p in local.parameters())
    torch.manual_seed(0)
    prompt = torch.randint(0, local.config.vocab_size, (1, args.prompt_len))
    extra = ["--log-level", "WARNING", "--direct"]
    with LocalSwarm(path, peers=peers, threads_per_peer=args.threads_per_peer, extra_args=extra) as swarm:
        clients = {
            name: AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, **settings)
            for name, settings in VARIANTS.items()
        }
        remote = clients["swarm"]
        try:
            for model in (*clients.values(), local):
                timed_generate(model, prompt, 4)  # warm-up: connections, allocator, kernels
            with clients["direct"].inference_session(max_length=8) as session:
                direct = all(stream.direct for stream in session._streams)
            meter = CpuMeter(process_groups(swarm))
            speeds: dict[str, list[float]] = {name: [] for name in (*VARIANTS, "local")}
            ttfts, local_cpu = [], []
            identical = True
            for _ in range(args.repeats):
                outputs = []
                for name, model in clients.items():
                    with meter if name == "swarm" else contextlib.nullcontext():
                        speed, ttft, out = timed_generate(model, prompt, args.new_tokens)
                    speeds[name].append(speed)
                    outputs.append(out)
                    if name == "swarm":
                        ttfts.append(ttft)
                began = time.process_time()
                speed, _, expected = timed_generate(local, prompt, args.new_tokens)
                local_cpu.append(time.process_time() - began)
                speeds["local"].append(speed)
                identical &= all(torch.equal(out, expected) for out in outputs)
            rtt_ms = rtt_floor_ms(remote)
        finally:
            for model in clients.values():
                model.shutdown()
    tokens = args.repeats * args.new_tokens
    tok_s = {name: statistics.median(values) for name, values in speeds.items()}
    result = {
        "model": name_of_model,
        "params_m": round(n_params / 1e6, 1),
        "peers": peers,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "direct_connections": direct,
    }
    for name in VARIANTS:
        prefix = "" if name == "swarm" else f"{name}_"
        result[f"{prefix}tok_s"] = round(tok_s[name], 2)
        result[f"{prefix}ratio"] = round(tok_s[name] / tok_s["local"], 3)
        result[f"{prefix}overhead_ms_per_token"] = round(1000 / tok_s[name] - 1000 / tok_s["local"], 2)
    return result | {
        "local_tok_s": round(tok_s["local"], 2),
        "ttft_s": round(statistics.median(ttfts), 4),
        "hivemind_rtt_ms": round(rtt_ms, 2),
        "cpu_ms_per_token": {k: round(1000 * v / tokens, 2) for k, v in meter.totals.items()},
        "local_cpu_ms_per_token": round(1000 * sum(local_cpu) / tokens, 2),
        "identical_tokens": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bench-small", "bench-110m"], choices=sorted(PRESETS))
    parser.add_argument("--peers", nargs="+", type=int, default=[2, 4], help="peer counts (blocks split evenly)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    # Batch-1 decoding is memory-bound: one thread per peer is as fast as two and leaves the cores to the others.
    parser.add_argument("--threads-per-peer", type=int, default=1)
    # One thread for the local model and the client too: on 2 cores it is faster than two, and it is what each peer
    # computes with, so the ratio compares the same compute.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (client, local model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="blockswarm-bench-") as tmp:
        for name in args.models:
            for peers in args.peers:
                print(json.dumps(bench_model(name, Path(tmp), args, peers)), flush=True)


if __name__ == "__main__":
    main()
