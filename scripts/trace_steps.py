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

Beside the segments, "floor" splits the overhead per token (the swarm's cycle against local's decoding step) into
three parts measured in the same run (see floor()): the compute penalty (the swarm's layers and client work against
local's, timed by hooks on its first and last layer; and the first peer's blocks in this process, hot and after
idling), the bare transport (a step-sized frame per hop through two libp2p daemons, with TLS and plain TCP beside it,
each after a peer's compute), and the glue left (our Python on either side of each hop).

    python scripts/trace_steps.py [--model bench-small] [--peers 2] [--tokens 64] [--repeats 5] [--direct]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvloop
from hivemind.p2p import P2P
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_inference import timed_generate  # noqa: E402
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from blocks.checkpoint import open_checkpoint  # noqa: E402
from blocks.span import load_span  # noqa: E402
from peers import trace  # noqa: E402
from peers.direct import self_signed_certificate  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.direct import client_context  # noqa: E402

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


class LayerClock:
    """Hooks on a local model's first and last decoder layer. For each decoding step (one new token; the prompt's
    prefill is left out): the time in its layers, and the time from its layers' start to the next step's (one
    token's whole cycle, as `cycle_us` is the swarm's)."""

    def __init__(self, model) -> None:
        layers = model.model.layers
        self.layers_ns: list[int] = []
        self.cycles_ns: list[int] = []
        self._began = 0
        self._last_decode: int | None = None  # when the last decoding step's layers began
        self._hooks = [
            layers[0].register_forward_pre_hook(self._begin),
            layers[-1].register_forward_hook(self._end),
        ]

    def _begin(self, *_) -> None:
        self._began = time.perf_counter_ns()

    def _end(self, _module, _args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[-2] != 1:  # a prefill: the next step starts a new generation
            self._last_decode = None
            return
        self.layers_ns.append(time.perf_counter_ns() - self._began)
        if self._last_decode is not None:
            self.cycles_ns.append(self._began - self._last_decode)
        self._last_decode = self._began

    def medians_us(self) -> tuple[float, float]:
        """(a decoding step's cycle, its time in the layers), medians in µs."""
        if not self.cycles_ns:
            raise ValueError("no two decoding steps in a row were timed")
        return statistics.median(self.cycles_ns) / 1000, statistics.median(self.layers_ns) / 1000

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@functools.cache
def _busy_operands() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(32000, 256), torch.randn(256)  # 32 MB: as much as an LM head streams


def _busy(seconds: float) -> None:
    """Compute (matrix-vector products over 32 MB) for `seconds`: what the processes of a step do between hops."""
    weights, x = _busy_operands()
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        weights @ x


async def _daemon_round_trips(payload: int, samples: int, gap: float) -> list[float]:
    """Round trips (µs) of `payload` bytes on one open libp2p stream between two fresh daemons on 127.0.0.1, each
    after `gap` seconds of compute (an echo handler in this process answers)."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    try:

        async def echo(_, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

        await server.add_binary_stream_handler("echo", echo)
        client = await P2P.create(initial_peers=await server.get_visible_maddrs())
        _, reader, writer = await client.call_binary_stream_handler(server.peer_id, "echo")
        message, times = os.urandom(payload), []
        for _ in range(samples):
            _busy(gap)
            began = time.perf_counter_ns()
            writer.write(message)
            await writer.drain()
            await reader.readexactly(payload)
            times.append((time.perf_counter_ns() - began) / 1000)
        writer.close()
        return times
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()


# Another process that echoes what one TCP connection sends (in TLS 1.3 if given a certificate and key), printing its
# port first.
_TCP_ECHO = """
import socket, ssl, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if len(sys.argv) > 1:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    connection = context.wrap_socket(connection, server_side=True)
while data := connection.recv(1 << 16):
    connection.sendall(data)
"""


def _tcp_round_trips(payload: int, samples: int, gap: float, tls: bool = False) -> list[float]:
    """Round trips (µs) of `payload` bytes over TCP (TLS 1.3 as direct connections use it, if `tls`) to another
    process, each after `gap` seconds of compute."""
    with tempfile.TemporaryDirectory() as folder:
        args = []
        if tls:
            cert, key = self_signed_certificate()
            args = [str(Path(folder, "cert.pem")), str(Path(folder, "key.pem"))]
            Path(args[0]).write_bytes(cert)
            Path(args[1]).touch(mode=0o600)
            Path(args[1]).write_bytes(key)
        server = subprocess.Popen([sys.executable, "-c", _TCP_ECHO, *args], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            connection = socket.create_connection(("127.0.0.1", port))
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                connection = client_context().wrap_socket(connection)
            with connection:
                message, times = os.urandom(payload), []
                for _ in range(samples):
                    _busy(gap)
                    began = time.perf_counter_ns()
                    connection.sendall(message)
                    received = 0
                    while received < payload:
                        received += len(connection.recv(1 << 16))
                    times.append((time.perf_counter_ns() - began) / 1000)
            return times
        finally:
            server.kill()
            server.wait()


def hop_us(payload: int, gap: float, samples: int = 100) -> dict[str, float]:
    """One hop's transport floor as a step meets it (every round trip after `gap` seconds of compute, as between
    the hops of a token, so the daemons and the other process have gone idle): half the median round trip of
    `payload` bytes through two libp2p daemons, over TLS between two processes (what a direct connection could
    cost at best) and over plain TCP (any transport's floor)."""
    times = {
        "libp2p": uvloop.run(_daemon_round_trips(payload, samples, gap)),
        "tls": _tcp_round_trips(payload, samples, gap, tls=True),
        "tcp": _tcp_round_trips(payload, samples, gap),
    }
    return {name: statistics.median(values[samples // 10 :]) / 2 for name, values in times.items()}


def resume_cost_us(path: Path, blocks: int, samples: int = 60) -> dict[str, float]:
    """The first peer's blocks in this process, decoding one token per step: the median step hot (one step right
    after another) and after idling as long as the step took (as a peer of a pipeline waits for its next turn). On a
    machine whose idle cores come back slowly, the second is longer: a penalty of splitting the layers over
    processes that take turns, which no transport can remove."""
    span = load_span(open_checkpoint(path), 0, blocks, progress=False)
    times: dict[str, list[float]] = {"hot": [], "after_idle": []}
    with torch.inference_mode():
        for mode, values in times.items():
            cache = span.new_cache()
            span(torch.randn(1, 16, span.hidden_size), cache, 0)
            took = 0.0
            for position in range(16, 16 + samples):
                x = torch.randn(1, 1, span.hidden_size)
                if mode == "after_idle":
                    time.sleep(took / 1e9)
                began = time.perf_counter_ns()
                span(x, cache, position)
                took = time.perf_counter_ns() - began
                values.append(took / 1000)
    return {mode: statistics.median(values[samples // 10 :]) for mode, values in times.items()}


def floor(
    result: dict, local_us: float, local_layers_us: float, hop: dict[str, float], hops: int, resume: dict[str, float]
) -> dict:
    """Where the swarm's overhead per token (its cycle against local's, `local_us`) goes, from the breakdown and the
    same run's local and transport measurements: the compute penalty (the swarm's layers and client work against
    the same work done locally: the same computation split over processes), `hops` bare transport hops (through
    the daemons; TLS and plain TCP for comparison), and what is left: glue, our Python on either side of each hop.
    The three add up to the overhead. `resume`: one peer's layers hot and after idling (resume_cost_us), which
    explains the layers' penalty."""
    penalty_layers = result["layers_us"] - local_layers_us
    penalty_client = result["client_between_steps_us"] - (local_us - local_layers_us)
    transport = hops * hop["libp2p"]
    return {
        "local_step_us": round(local_us, 1),
        "overhead_us": round(result["cycle_us"] - local_us, 1),
        "local_layers_us": round(local_layers_us, 1),
        "compute_penalty_us": round(penalty_layers + penalty_client, 1),
        "compute_penalty_layers_us": round(penalty_layers, 1),
        "compute_penalty_client_us": round(penalty_client, 1),
        "peer0_blocks_hot_us": round(resume["hot"], 1),
        "peer0_blocks_after_idle_us": round(resume["after_idle"], 1),
        "hops": hops,
        "libp2p_hop_us": round(hop["libp2p"], 1),
        "tls_hop_us": round(hop["tls"], 1),
        "tcp_hop_us": round(hop["tcp"], 1),
        "bare_transport_us": round(transport, 1),
        "glue_us": round(result["rest_us"] - transport, 1),
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
                clock = LayerClock(local)
                for _ in range(args.repeats):
                    for name, m in (("swarm", model), ("local", local)):
                        speeds[name].append(timed_generate(m, prompt, args.tokens)[0])
                clock.close()
            finally:
                model.shutdown()
        trace.flush()
        result = breakdown(read_events(directory))
        # a step's frame (one token's hidden state and a few hundred bytes of header and chain), after as much
        # compute as one peer's layers take
        hop = hop_us(4 * local.config.hidden_size + 256, gap=result["layers_us"] / args.peers / 1e6)
        resume = resume_cost_us(path, local.config.num_hidden_layers // args.peers)
    local_step_us, local_layers_us = clock.medians_us()
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
                # hops: client -> first peer, each push, last peer -> client
                "floor": floor(result, local_step_us, local_layers_us, hop, args.peers + 1, resume),
            }
        )
    )


if __name__ == "__main__":
    main()
