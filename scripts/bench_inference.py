"""Benchmark: greedy generation through a 2-peer swarm on loopback vs local transformers, same weights, same run.

For each model it makes a random-weight Llama checkpoint, starts 2 peers (an even split of the blocks) on
127.0.0.1, and alternates timed runs of 64 greedy tokens through the swarm with peer-to-peer push (the default),
through the swarm with client-relayed steps, and through local ``transformers.generate``. It prints one JSON line
per model: swarm_tok_s (default settings), relay_tok_s, local_tok_s (medians over repeats), ratio, ttft_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402


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
    ttft = streamer.times[1] - start
    return new_tokens / (end - start), ttft, out


def bench_model(
    name: str, workdir: Path, repeats: int, new_tokens: int, prompt_len: int, threads: int, peers: int
) -> dict:
    path = make_random_checkpoint(workdir / name, "llama", **PRESETS[name])
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, local.config.vocab_size, (1, prompt_len))
    with LocalSwarm(path, peers=peers, threads_per_peer=threads, extra_args=["--log-level", "WARNING"]) as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        relayed = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, push=False)
        try:
            for model in (remote, relayed, local):
                timed_generate(model, prompt, 4)  # warm-up: connections, allocator, kernels
            swarm_speed, relay_speed, local_speed, ttfts = [], [], [], []
            identical = True
            for _ in range(repeats):
                s, ttft, out_s = timed_generate(remote, prompt, new_tokens)
                r, _, out_r = timed_generate(relayed, prompt, new_tokens)
                lo, _, out_l = timed_generate(local, prompt, new_tokens)
                swarm_speed.append(s)
                relay_speed.append(r)
                local_speed.append(lo)
                ttfts.append(ttft)
                identical &= torch.equal(out_s, out_l) and torch.equal(out_r, out_l)
        finally:
            remote.shutdown()
            relayed.shutdown()
    swarm_tok_s, local_tok_s = statistics.median(swarm_speed), statistics.median(local_speed)
    relay_tok_s = statistics.median(relay_speed)
    return {
        "model": name,
        "params_m": round(n_params / 1e6, 1),
        "peers": peers,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "swarm_tok_s": round(swarm_tok_s, 2),
        "relay_tok_s": round(relay_tok_s, 2),
        "local_tok_s": round(local_tok_s, 2),
        "ratio": round(swarm_tok_s / local_tok_s, 3),
        "relay_ratio": round(relay_tok_s / local_tok_s, 3),
        "push_vs_relay": round(swarm_tok_s / relay_tok_s, 3),
        "ttft_s": round(statistics.median(ttfts), 4),
        "overhead_ms_per_token": round(1000 / swarm_tok_s - 1000 / local_tok_s, 2),
        "identical_tokens": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["bench-110m", "bench-small"], choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    # Batch-1 decoding is memory-bound: one thread per peer is as fast as two and leaves the cores to the others.
    parser.add_argument("--threads-per-peer", type=int, default=1)
    parser.add_argument("--peers", type=int, default=2, help="the blocks are split evenly over this many peers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-bench-") as tmp:
        for name in args.models:
            result = bench_model(
                name, Path(tmp), args.repeats, args.new_tokens, args.prompt_len, args.threads_per_peer, args.peers
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
