"""Benchmark: concurrent inference sessions on peers with continuous batching on and off, in the same run.

For each setup (one peer serving all blocks of the ~110M model; two peers splitting them) and for batching on (the
default) and off (``--max-batch-sessions 1``), it starts the peers on 127.0.0.1 and runs 1, 2, 4, 8 and 16
concurrent sessions of 64 greedy tokens (each session its own thread of one client process, all started together).
One JSON line per (setup, batching, sessions): aggregate tokens/s (all sessions' new tokens over the wall time),
the median and p95 time between two tokens of a session, the peers' mean batch size, how busy the peers were
(compute time over wall time) and the client process's CPU time over wall time (1.0: one core).

    python scripts/bench_concurrency.py [--model bench-110m] [--sessions 1 2 4 8 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_inference import TokenTimes  # noqa: E402
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.transport import call_info  # noqa: E402


def run_sessions(model, prompts: list[torch.Tensor], new_tokens: int) -> tuple[float, list[float]]:
    """All prompts at once, one thread each: (aggregate tokens/s, every gap between two tokens of a session)."""
    streamers = [TokenTimes() for _ in prompts]
    barrier = threading.Barrier(len(prompts))
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(60)
            with torch.inference_mode():
                model.generate(
                    prompts[i],
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    streamer=streamers[i],
                )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(s.times[-1] for s in streamers) - began
    gaps = [b - a for s in streamers for a, b in zip(s.times[1:], s.times[2:], strict=False)]
    return len(prompts) * new_tokens / wall, gaps


def batch_stats(model) -> tuple[int, int, float]:
    """Summed over the peers: batches run, steps in them, seconds spent computing."""
    sequence = model.model.sequence
    totals = [0, 0, 0.0]
    for peer_id in sequence.view.snapshot(refresh=True).peers:
        stats = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0)).stats
        totals[0] += int(stats.get("batches", 0))
        totals[1] += int(stats.get("batched_steps", 0))
        totals[2] += float(stats.get("compute_seconds", 0.0))
    return totals[0], totals[1], totals[2]


def bench_setup(path: Path, peers: int, batching: bool, args: argparse.Namespace) -> list[dict]:
    extra = ["--log-level", "WARNING"] + ([] if batching else ["--max-batch-sessions", "1"])
    if args.batch_wait is not None:
        extra += ["--batch-wait", str(args.batch_wait)]
    vocab = PRESETS[args.model]["vocab_size"]
    results = []
    with LocalSwarm(path, peers=peers, threads_per_peer=args.threads_per_peer, extra_args=extra) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            model.generate(torch.randint(0, vocab, (1, 8)), max_new_tokens=4)  # warm-up
            for count in args.sessions:
                prompts = [
                    torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(i))
                    for i in range(count)
                ]
                before = batch_stats(model)
                cpu_before = time.process_time()
                began = time.perf_counter()
                tok_s, gaps = run_sessions(model, prompts, args.new_tokens)
                wall = time.perf_counter() - began
                client_cpu = time.process_time() - cpu_before
                after = batch_stats(model)
                batches, steps = after[0] - before[0], after[1] - before[1]
                peers_busy = (after[2] - before[2]) / (wall * peers)
                gaps.sort()
                results.append(
                    {
                        "model": args.model,
                        "peers": peers,
                        "batching": batching,
                        "sessions": count,
                        "new_tokens": args.new_tokens,
                        "aggregate_tok_s": round(tok_s, 2),
                        "token_gap_median_ms": round(1000 * statistics.median(gaps), 1),
                        "token_gap_p95_ms": round(1000 * gaps[int(0.95 * (len(gaps) - 1))], 1),
                        "mean_batch_sessions": round(steps / batches, 2) if batches else None,
                        "peer_busy": round(peers_busy, 2),  # share of the wall time the peers spent computing
                        "client_cpu_share": round(client_cpu / wall, 2),  # of one core
                    }
                )
                print(json.dumps(results[-1]), flush=True)
        finally:
            model.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-110m", choices=sorted(PRESETS))
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--peers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads-per-peer", type=int, default=1)
    parser.add_argument("--batch-wait", type=float, default=None, help="the peers' --batch-wait (default: theirs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="blockswarm-bench-") as tmp:
        path = make_random_checkpoint(Path(tmp) / args.model, "llama", **PRESETS[args.model])
        summary = []
        for peers in args.peers:
            for batching in (True, False):
                summary += bench_setup(path, peers, batching, args)
        for peers in args.peers:
            on = {r["sessions"]: r["aggregate_tok_s"] for r in summary if r["peers"] == peers and r["batching"]}
            off = {r["sessions"]: r["aggregate_tok_s"] for r in summary if r["peers"] == peers and not r["batching"]}
            speedup = {n: round(on[n] / on[min(on)], 2) for n in on}
            print(json.dumps({"peers": peers, "scaling_vs_1_session": speedup, "on_vs_off": {
                n: round(on[n] / off[n], 2) for n in on if n in off}}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
