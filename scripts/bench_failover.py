"""Benchmark: a peer is killed (SIGKILL) in the middle of a generation while a replica of its blocks is alive.

Starts 3 peers on 127.0.0.1 (blocks [0, n/2) on one, [n/2, n) on two), generates 64 greedy tokens through the
swarm and kills the peer serving the second half when token 32 comes out. Prints one JSON line with the extra
delay of the failover token over the median token time, and whether the tokens equal a run without failure.
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
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402


class KillAndTime(BaseStreamer):
    """Records when each token comes out; kills the peer serving the last span when token `kill_at` is out."""

    def __init__(self, model, swarm: LocalSwarm, kill_at: int | None):
        self.model, self.swarm, self.kill_at = model, swarm, kill_at
        self.times: list[float] = []
        self.failovers = 0

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        session = self.model.active_session
        if self.kill_at is not None and len(self.times) == self.kill_at + 1:  # the first put() is the prompt
            peer_id = session.route[-1].peer_id.to_base58()
            [peer] = [p for p in self.swarm.peers if p.info["peer_id"] == peer_id]
            peer.process.kill()
            peer.process.wait()
        self.session = session

    def end(self) -> None:
        self.failovers = self.session.failovers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bench-small", choices=sorted(PRESETS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kill-at", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-failover-") as tmp:
        path = make_random_checkpoint(Path(tmp) / args.model, "llama", **PRESETS[args.model])
        n = PRESETS[args.model]["num_hidden_layers"]
        spans = [(0, n // 2), (n // 2, n), (n // 2, n)]
        with LocalSwarm(path, spans=spans, threads_per_peer=1, extra_args=["--log-level", "WARNING"]) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            try:
                prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
                kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                model.generate(prompt, max_new_tokens=4)  # warm-up
                reference = model.generate(prompt, **kwargs)
                timer = KillAndTime(model, swarm, args.kill_at)
                started = time.perf_counter()
                out = model.generate(prompt, streamer=timer, **kwargs)
            finally:
                model.shutdown()
    gaps = [b - a for a, b in zip([started, *timer.times[:-1]], timer.times, strict=True)][1:]  # per new token
    failover_gap = gaps[args.kill_at]  # the token computed right after the kill
    median = statistics.median(gaps)
    print(
        json.dumps(
            {
                "model": args.model,
                "new_tokens": args.new_tokens,
                "killed_at_token": args.kill_at,
                "failovers": timer.failovers,
                "median_token_s": round(median, 4),
                "failover_token_s": round(failover_gap, 4),
                "extra_delay_s": round(failover_gap - median, 4),
                "identical_to_no_failure_run": bool(torch.equal(out, reference)),
            }
        )
    )


if __name__ == "__main__":
    main()
