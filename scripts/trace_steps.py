"""Where a decoded token's time goes: a timeline of each step across the client and its peers (peers.trace).

Starts a local swarm of random-weight Llama peers on 127.0.0.1 with step tracing on (BLOCKSWARM_TRACE_DIR), decodes
greedy tokens through it (the default client: libp2p streams, push from peer to peer), times local transformers on
the same prompt in the same run, and prints one JSON line: the median of each segment of a token's critical path,
in microseconds of wall time, with the thread CPU time spent in it where both ends are events of one thread (a
segment whose CPU time is close to its wall time is work, not waiting; the same code is several times slower here
than in a hot loop, because the layers between two steps evict it from the CPU caches). Segments, in order:

    client_prepares        the session's step begins (main thread) -> the client starts sending it
    send_to_peer{k}        -> peer k took it from its inbox (encode, write, libp2p daemons, read, parse)
    peer{k}_accepts        -> decoded, checked, its cache prepared
    peer{k}_schedules      -> the layers begin (the peer's compute scheduler)
    peer{k}_layers         -> the layers end
    peer{k}_returns        -> the session has the output (back from the scheduler)
    peer{k}_pushes         -> the output is encoded and pushed to peer k+1 (all but the last peer)
    push_to_peer{k+1}      -> peer k+1 took it from its inbox
    peer{last}_replies     -> the output is encoded and sent to the client
    reply_to_client        -> the client's reader took it off the connection
    client_decodes         -> the session has the output (decoded, checked)
    client_returns         -> the main thread has it back
    client_between_steps   -> the next step begins: the final norm, LM head, generate's loop, the next embedding

    python scripts/trace_steps.py [--model bench-small] [--peers 2] [--tokens 64] [--repeats 5] [--direct]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_inference import timed_generate  # noqa: E402
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from peers import trace  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402

_PLACE = re.compile(r"^(client|peer)\[(\d+):(\d+)\]$")


@dataclass(frozen=True)
class Event:
    pid: int
    thread: int
    where: str
    what: str
    step: int
    ns: int
    cpu_ns: int


def read_events(directory: str | os.PathLike) -> list[Event]:
    """Every event of every process that traced into `directory`, in time order."""
    events = []
    for path in Path(directory).glob("*.csv"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            where, what, step, ns, cpu, thread = line.split(",")
            events.append(Event(pid, int(thread), where, what, int(step), int(ns), int(cpu)))
    events.sort(key=lambda e: e.ns)
    return events


def route_of(events: list[Event]) -> list[tuple[int, int]]:
    """The spans [start, end) of the peers the steps went through, in block order."""
    spans = set()
    for e in events:
        match = _PLACE.match(e.where)
        if match and match.group(1) == "peer":
            spans.add((int(match.group(2)), int(match.group(3))))
    return sorted(spans)


def _segments(route: list[tuple[int, int]]) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """(name, (where, what) it starts at, (where, what) it ends at) along a token's critical path."""

    def peer(k: int) -> str:
        return trace.place("peer", *route[k])

    def client(k: int) -> str:
        return trace.place("client", *route[k])

    last = len(route) - 1
    out = [
        ("client_prepares", (trace.CLIENT, trace.STEP_CALLED), (client(0), trace.SENT)),
        ("send_to_peer0", (client(0), trace.SENT), (peer(0), trace.RECEIVED)),
    ]
    for k in range(len(route)):
        out += [
            (f"peer{k}_accepts", (peer(k), trace.RECEIVED), (peer(k), trace.ACCEPTED)),
            (f"peer{k}_schedules", (peer(k), trace.ACCEPTED), (peer(k), trace.COMPUTE_BEGAN)),
            (f"peer{k}_layers", (peer(k), trace.COMPUTE_BEGAN), (peer(k), trace.COMPUTE_ENDED)),
            (f"peer{k}_returns", (peer(k), trace.COMPUTE_ENDED), (peer(k), trace.COMPUTED)),
        ]
        if k < last:
            out += [
                (f"peer{k}_pushes", (peer(k), trace.COMPUTED), (peer(k), trace.PUSHED)),
                (f"push_to_peer{k + 1}", (peer(k), trace.PUSHED), (peer(k + 1), trace.RECEIVED)),
            ]
    out += [
        (f"peer{last}_replies", (peer(last), trace.COMPUTED), (peer(last), trace.REPLIED)),
        ("reply_to_client", (peer(last), trace.REPLIED), (client(last), trace.REPLY_READ)),
        ("client_decodes", (client(last), trace.REPLY_READ), (client(last), trace.OUTPUT)),
        ("client_returns", (client(last), trace.OUTPUT), (trace.CLIENT, trace.STEP_RETURNED)),
    ]
    return out


def breakdown(events: list[Event], skip: int = 4) -> dict:
    """Median wall (and, within one thread, CPU) microseconds of each segment of a token's critical path, over the
    steps that have every event once (a step with a failover or a late push has more and is left out), the first
    `skip` steps left out (warm-up); plus the whole cycle and `client_between_steps`.

    A step's events are those between its STEP_CALLED and the next one; each segment goes from the first event of
    its start after the step began to the first event of its end after that."""
    route = route_of(events)
    if not route:
        raise ValueError("no peer events in the trace: were the peers started with BLOCKSWARM_TRACE_DIR set?")
    segments = _segments(route)
    starts = [i for i, e in enumerate(events) if e.where == trace.CLIENT and e.what == trace.STEP_CALLED]
    wall: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, list[float]] = collections.defaultdict(list)
    cycles = []
    for n, (begin, end) in enumerate(zip(starts, starts[1:], strict=False)):
        if n < skip:
            continue
        step = events[begin:end]
        counts = collections.Counter((e.where, e.what) for e in step)
        needed = {point for _, a, b in segments for point in (a, b)}
        if any(counts[point] != 1 for point in needed):
            continue
        at = {(e.where, e.what): e for e in step}
        for name, a, b in segments:
            first, second = at[a], at[b]
            wall[name].append((second.ns - first.ns) / 1000)
            if (first.pid, first.thread) == (second.pid, second.thread):
                cpu[name].append((second.cpu_ns - first.cpu_ns) / 1000)
        returned = at[(trace.CLIENT, trace.STEP_RETURNED)]
        wall["client_between_steps"].append((events[end].ns - returned.ns) / 1000)
        if returned.thread == events[end].thread:
            cpu["client_between_steps"].append((events[end].cpu_ns - returned.cpu_ns) / 1000)
        cycles.append((events[end].ns - events[begin].ns) / 1000)
    if not cycles:
        raise ValueError("no complete step in the trace")
    names = [name for name, _, _ in segments] + ["client_between_steps"]
    rows = [
        {
            "segment": name,
            "wall_us": round(statistics.median(wall[name]), 1),
            "cpu_us": round(statistics.median(cpu[name]), 1) if cpu[name] else None,
        }
        for name in names
    ]
    layers = sum(r["wall_us"] for r in rows if r["segment"].endswith("_layers"))
    between = rows[-1]["wall_us"]
    cycle = statistics.median(cycles)
    return {
        "steps": len(cycles),
        "cycle_us": round(cycle, 1),
        "layers_us": round(layers, 1),
        "client_between_steps_us": round(between, 1),
        "rest_us": round(cycle - layers - between, 1),  # transport and glue: what local generation does not have
        "segments": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-small", help="a preset of scripts/model_tools.py")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument(
        "--direct", action="store_true", help="peers offer and the client uses direct connections (swarm-peer --direct)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-trace-") as tmp:
        directory = Path(tmp) / "trace"
        trace.enable(directory)  # this process and the peers it starts
        torch.set_num_threads(1)  # as bench_inference: one thread for the client, the local model and each peer
        path = Path(tmp) / args.model
        make_random_checkpoint(path, "llama", **PRESETS[args.model])
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(0)
        prompt = torch.randint(0, local.config.vocab_size, (1, args.prompt_len))
        extra = ["--log-level", "WARNING"] + (["--direct"] if args.direct else [])
        with LocalSwarm(path, peers=args.peers, threads_per_peer=1, extra_args=extra) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, direct=args.direct
            )
            try:
                speeds: dict[str, list[float]] = {"swarm": [], "local": []}
                for _ in range(args.repeats):
                    for name, m in (("swarm", model), ("local", local)):
                        speeds[name].append(timed_generate(m, prompt, args.tokens)[0])
            finally:
                model.shutdown()
        trace.flush()
        result = breakdown(read_events(directory))
    tok_s = {name: statistics.median(values) for name, values in speeds.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "peers": args.peers,
                "direct": args.direct,
                "tok_s": round(tok_s["swarm"], 2),
                "local_tok_s": round(tok_s["local"], 2),
                "local_us_per_token": round(1e6 / tok_s["local"], 1),
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
