"""Chaos run: many inference sessions through a swarm whose peers are killed and restarted all along.

Starts a DHT bootstrap node and 2 replicas of every span (4 peers by default) on 127.0.0.1, then runs N sessions
(default 50, a few at a time) of greedy generation while a background loop kills a random peer (SIGKILL or
SIGTERM), waits, and restarts it with the same identity. At most one replica of a span is down at a time, so every
session can always finish. Each session's tokens are compared with local transformers on the same weights.
Prints one JSON line: sessions completed, identical to the reference, failovers, kills, p50/p95 token time.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LOOPBACK, LocalSwarm, PeerProcess, SwarmStartError  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402

PEER_FLAGS = ["--log-level", "WARNING", "--announce-period", "1", "--record-ttl", "3", "--rebalance-period", "0"]


class TokenTimes(BaseStreamer):
    """Times between successive generated tokens, and the session's failover count."""

    def __init__(self, model):
        self.model, self.stamps, self.failovers = model, [], 0

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())
        session = self.model.active_session
        if session is not None:
            self.failovers = session.failovers

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:], strict=False)]  # stamps[0]: the prompt


class Chaos(threading.Thread):
    """Every `period` s kills one random peer whose replicas are all up, and restarts it (same identity and span)
    `down_time` s later without waiting for it: at most one replica of a span is ever down or starting."""

    def __init__(self, swarm: LocalSwarm, slots: list[dict], period: float, down_time: float, seed: int):
        super().__init__(name="chaos", daemon=True)
        self.swarm, self.slots = swarm, slots
        self.period, self.down_time = period, down_time
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills, self.restarts, self.errors = 0, 0, []
        for slot in slots:
            slot["state"] = "up"

    def _partners_up(self, slot: dict) -> bool:
        return all(s["state"] == "up" for s in self.slots if s["span"] == slot["span"] and s is not slot)

    def run(self) -> None:
        next_kill = time.monotonic() + self.period
        while not self.stop_event.wait(0.05):
            now = time.monotonic()
            for slot in self.slots:
                peer: PeerProcess = slot["peer"]
                if slot["state"] == "down" and now >= slot["down_since"] + self.down_time:
                    slot["peer"] = self.swarm.start_peer(slot["span"], extra_args=slot["args"], name=slot["name"],
                                                         wait=False)  # fmt: skip
                    slot["state"] = "starting"
                elif slot["state"] == "starting" and peer.ready_file.exists():
                    self.swarm.wait_ready(peer)
                    slot["state"] = "up"
                    self.restarts += 1
                elif slot["state"] == "starting" and peer.process.poll() is not None:
                    self.errors.append(f"{slot['name']} exited with {peer.process.returncode} while starting")
                    slot["state"], slot["down_since"] = "down", now
            if now < next_kill:
                continue
            candidates = [s for s in self.slots if s["state"] == "up" and self._partners_up(s)]
            if candidates:
                slot = self.rng.choice(candidates)
                slot["peer"].process.send_signal(self.rng.choice([signal.SIGKILL, signal.SIGTERM]))
                slot["peer"].process.wait(30)
                slot["state"], slot["down_since"] = "down", time.monotonic()
                self.kills += 1
            next_kill = time.monotonic() + self.period


def start_bootstrap(workdir: Path) -> tuple[subprocess.Popen, list[str]]:
    ready = workdir / "dht.ready.json"
    process = subprocess.Popen(
        [sys.executable, "-c", "from peers.cli import dht_main; dht_main()", "--host-maddrs", LOOPBACK,
         "--ready-file", str(ready), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SwarmStartError("the DHT bootstrap node did not start")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())["maddrs"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-small", choices=sorted(PRESETS))
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4, help="sessions running at the same time")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--spans", type=int, default=2, help="the model is split into this many spans")
    parser.add_argument("--kill-period", type=float, default=1.0, help="seconds between a restart and the next kill")
    parser.add_argument("--down-time", type=float, default=0.5, help="seconds a killed peer stays down")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.sessions < 1 or args.concurrency < 1 or args.new_tokens < 1 or args.spans < 1:
        parser.error("--sessions, --concurrency, --new-tokens and --spans must be >= 1")

    with tempfile.TemporaryDirectory(prefix="blockswarm-chaos-") as tmp:
        workdir = Path(tmp)
        path = make_random_checkpoint(workdir / args.model, "llama", **PRESETS[args.model])
        n = PRESETS[args.model]["num_hidden_layers"]
        bounds = [round(i * n / args.spans) for i in range(args.spans + 1)]
        spans = [(bounds[i], bounds[i + 1]) for i in range(args.spans)]
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, local.config.vocab_size, (1, int(torch.randint(4, 17, (1,), generator=gen))),
                                 generator=gen) for _ in range(args.sessions)]  # fmt: skip
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        references = [local.generate(p, **kwargs) for p in prompts]

        bootstrap, maddrs = start_bootstrap(workdir)
        swarm = LocalSwarm(path, threads_per_peer=1, workdir=workdir, bootstrap=maddrs)
        model = None
        chaos = None
        try:
            slots = []
            for span in spans:
                for replica in range(2):
                    name = f"peer-{span[0]}-{span[1]}-{replica}"
                    extra = [*PEER_FLAGS, "--identity-path", str(workdir / f"{name}.key")]
                    slots.append({"span": span, "args": extra, "name": name})
            for slot in slots:
                slot["peer"] = swarm.start_peer(slot["span"], extra_args=slot["args"], name=slot["name"])
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path,
                initial_peers=maddrs,
                ban_seconds=0.5,
                max_ban_seconds=2.0,
                failover_timeout=10.0,
                max_failovers=8,
                refresh_period=0.5,
            )

            def run_session(i: int) -> tuple[bool, bool, list[float], int, str]:
                timer = TokenTimes(model)
                try:
                    out = model.generate(prompts[i], streamer=timer, **kwargs)
                except Exception as e:
                    return False, False, timer.gaps(), timer.failovers, f"{type(e).__name__}: {e}"
                return True, torch.equal(out, references[i]), timer.gaps(), timer.failovers, ""

            model.generate(prompts[0], max_new_tokens=2)  # warm-up, before the chaos starts
            chaos = Chaos(swarm, slots, args.kill_period, args.down_time, args.seed)
            started = time.perf_counter()
            chaos.start()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(run_session, range(args.sessions)))
            wall = time.perf_counter() - started
        finally:
            if chaos is not None:
                chaos.stop_event.set()
                chaos.join(120)
            if model is not None:
                model.shutdown()
            swarm.stop()
            bootstrap.send_signal(signal.SIGTERM)
            bootstrap.wait(20)

    gaps = [g for _, _, session_gaps, _, _ in results for g in session_gaps]
    errors = [e for *_, e in results if e]
    print(
        json.dumps(
            {
                "model": args.model,
                "peers": len(slots),
                "replicas_per_block": 2,
                "sessions": args.sessions,
                "concurrency": args.concurrency,
                "new_tokens": args.new_tokens,
                "completed": sum(ok for ok, *_ in results),
                "identical": sum(same for _, same, *_ in results),
                "failovers": sum(f for *_, f, _ in results),
                "kills": chaos.kills,
                "restarts": chaos.restarts,
                "token_s_p50": round(statistics.median(gaps), 4) if gaps else None,
                "token_s_p95": round(percentile(gaps, 0.95), 4),
                "token_s_max": round(max(gaps), 4) if gaps else None,
                "wall_s": round(wall, 1),
                "errors": errors[:5],
                "chaos_errors": chaos.errors,
            }
        )
    )


if __name__ == "__main__":
    main()
